"""Continuous batching: every answer being generated shares each forward pass.

Answers join the batch between decoding steps and leave it the step they end (EOS, a stop
string, ``max_new_tokens``, or a cancel), so no row waits for the longest answer and no
finished row is computed again. The same :class:`Batcher` serves the batch API
(:meth:`Engine.generate <medassist.engine.Engine.generate>`, evaluation: prompts are fed in
as rows free up) and the server (:class:`BatchScheduler`, a thread that takes requests as
they arrive and streams each one's tokens).

**Why not transformers' own continuous batching** (``generate_batch`` /
``init_continuous_batching``, tried first, transformers 5.24, torch 2.13 CPU, fp32, SmolLM2-135M
and a LoRA-wrapped model): it runs on CPU, with a PEFT model too, and its greedy answers equal
unbatched ones, but it does not do what is needed here (measured on 1 thread of the shared
2-core VM):

- on CPU its attention (``sdpa`` over its paged cache) puts every request of a step in one
  flattened sequence with a dense ``[sum of queries x sum of keys]`` mask, so attention work
  grows with the square of the batch: 48 MedQuAD prompts x 24 tokens took 19.3 s against
  11.5 s for plain ``generate`` with one batch of 48 (16 prompts: 9.8 s vs 10.1 s, no gain);
- ``do_sample`` and the seed belong to the manager, not the request (greedy and sampled
  requests cannot share a batch; per-request seeds do not exist); stop strings are not
  supported and ``repetition_penalty`` is dropped with a warning;
- its prefix sharing only reuses whole pages that an earlier forward completed, so requests
  that arrive together (an evaluation) share nothing;
- encoder-decoder models are not supported at all.

**How it works.** Each row (sequence) owns one slot of a preallocated key/value cache
(:class:`SlotCache`, ``[rows, kv heads, positions, head dim]`` per layer), its tokens from
column 0, so rows of any length sit side by side and a row that leaves frees its slot without
touching the others (the last row moves into the hole). A decoding step feeds one token per
row with its own position id and a ``[rows, 1, 1, keys]`` mask; new rows are prefilled
together, left-padded so each one's last prompt token is the last column. The cache is handed
to the transformers model as its ``cache`` argument (the model writes each layer's new keys
and values through :meth:`SlotCache.update`), so the model code itself is unchanged.
Prompt prefixes shared with other prompts (the system prompt, a conversation's earlier
turns, MedQuAD's question templates) are computed once and copied into each row
(:class:`PrefixStore`): a prompt is prefilled only from where it differs. On the evaluation
workload (64 MedQuAD prompts x 64 greedy tokens, SmolLM2 fp32, 1 thread of the shared VM):
``generate`` in batches of 16 took 45.2 s, this batcher 38.6 s with 16 rows and 21.0 s with 64,
answers identical (64/64). Decoding a few rows is bound by reading every weight once per
step, so rows are what pays.

The stop rule and the sampling rule are the engine's: the engine's stop ids and stop
strings, and, per row, transformers' own logits processors in ``generate``'s order
(repetition penalty, no-repeat n-grams; with sampling, temperature, top-k, top-p, min-p).
Greedy rows take the argmax of the fp32 logits, as ``generate`` does; greedy answers equal
unbatched ones (tests/test_batching.py). Each row samples with its own generator when it has
a seed, so a seeded answer does not depend on what else is in the batch.

Models the batcher does not take (:func:`batching_problem`): encoder-decoder models (their
decoder cross-attends to per-row encoder states, which this cache does not hold: they keep
transformers' batched ``generate``), attention other than ``sdpa``/``eager``, sliding-window
layers, and anything that is not a plain torch module (test stubs that only offer
``generate``).

Read in this order:

- :mod:`~medassist.batching.batcher`: :class:`Batcher`, one step (admit and prefill new rows,
  decode one token for every row, retire ended ones), and :func:`batching_problem`;
- :mod:`~medassist.batching.cache`: :class:`SlotCache` (a slot per row) and :class:`PrefixStore`
  (shared prompt prefixes);
- :mod:`~medassist.batching.rows`: :class:`Row` (one answer being generated) and :class:`Picker`
  (its sampling rule);
- :mod:`~medassist.batching.scheduler`: what feeds a batcher: :class:`BatchScheduler` (the
  server's thread) and :func:`generate_rows` (the batch API).
"""

from medassist.batching.batcher import ATTENTION, PREFILL_TOKENS, Batcher, batching_problem, language_model
from medassist.batching.cache import PrefixStore, SlotCache
from medassist.batching.rows import Picker, Row, make_row
from medassist.batching.scheduler import BatchScheduler, generate_rows

__all__ = ["ATTENTION", "PREFILL_TOKENS", "Batcher", "BatchScheduler", "PrefixStore", "Picker", "Row", "SlotCache",
           "batching_problem", "generate_rows", "language_model", "make_row"]
