"""Training: fine-tune a model into a run directory.

Read in this order:

- :mod:`~medassist.training.recipe`: :func:`train`, the run from top to bottom (set up ->
  model -> tokens -> fit -> validate and save -> evaluate), and the steps it is made of;
- :mod:`~medassist.training.examples`: question/answer pairs -> input ids and answer-only labels,
  and the seeded validation and test subsets;
- :mod:`~medassist.training.trainer`: the thin ``Trainer`` subclass (answer-only loss,
  generation metrics, resumable data order), its callbacks and arguments;
- :mod:`~medassist.training.speed`: speed and memory switches (bf16 frozen weights under LoRA, the
  answer-only head in chunks);
- :mod:`~medassist.training.checkpoints`: the ``.complete`` marker with checksums, which
  checkpoint ``--resume`` continues from, ``metrics.jsonl`` after a resume;
- :mod:`~medassist.training.precision`: bf16 where the hardware runs it fast, else fp32.

Rank helpers live in :mod:`medassist.distributed`.
"""

from medassist.training.checkpoints import (
    COMPLETE_MARKER, STATE_FILE, CheckpointCompletion, CheckpointWarning, checkpoint_problem,
    find_resume_checkpoint, truncate_metrics, write_complete_marker,
)
from medassist.training.examples import (
    TokenizedSplit, _test_subset, to_dataset, tokenize_examples, validation_loss_subset,
)
from medassist.training.precision import cpu_supports_bf16, resolve_precision
from medassist.training.recipe import (
    TrainResult, build_model, check_tracker, parameter_counts, setup_run, train, uses_lora,
)
from medassist.training.trainer import (
    EpochSeededSampler, GracefulStop, JsonlMetricsCallback, MedassistTrainer, columns_collator,
    training_arguments,
)

__all__ = [
    "COMPLETE_MARKER", "STATE_FILE", "CheckpointCompletion", "CheckpointWarning", "EpochSeededSampler",
    "GracefulStop", "JsonlMetricsCallback", "MedassistTrainer", "TokenizedSplit", "TrainResult", "build_model",
    "check_tracker", "checkpoint_problem", "columns_collator", "cpu_supports_bf16", "find_resume_checkpoint",
    "parameter_counts", "resolve_precision", "setup_run", "to_dataset", "tokenize_examples", "train",
    "training_arguments", "truncate_metrics", "uses_lora", "validation_loss_subset", "write_complete_marker",
]
