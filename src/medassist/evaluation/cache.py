"""The baselines' scored answers, kept between runs: they need not be recomputed.

Every evaluation scores the untuned base model, "the answer of the nearest training question"
and "repeat the question" beside the tuned model (:mod:`.baselines`). None of them depends on
what was trained: a second run that changes the adapter, the learning rate or the number of
steps would compute them again unchanged (the base model alone is about 3 of the 20 minutes of
the default 100-step run; the other two about 30 s of every report, bench/RESULTS.md). So they
are stored under a key hashed from *everything* they depend on (lm-eval-harness caches model
requests the same way) and reused only when every part matches:

- the questions and references, the BERTScore and factual-consistency settings, every file of
  the installed medassist package, the name and version of every installed distribution,
  Python, the CPU's model and flags and torch's thread count (all three baselines);
- the base model: its weights and buffers, hashed as they are when it answers (PEFT's adapter
  weights left out: they are switched off), its config, attention kernel, stop tokens; the
  prompt token ids (system prompt, chat template, retrieved passages), the tokenizer, the
  formatter's settings; the generation settings, the batching switch, the perplexity settings
  and the device;
- the nearest training question: the training rows searched (questions, answers, rows,
  groups), the asked questions' groups and the question encoder.

A wrong baseline would be a silent wrong verdict, so anything not covered here is a miss, never
a guess: an unreadable entry is recomputed. ``eval.cache_baselines: false`` turns the cache off;
the entries live in ``$MEDASSIST_CACHE/baselines`` (default ``~/.cache/medassist/baselines``;
``$MEDASSIST_BASELINE_CACHE`` names another folder), one JSON file each, with the parts of their
key in readable form. The folder keeps the ``MAX_ENTRIES`` most recently used entries (about
100 KB each for 150 questions); older ones are deleted when a new one is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medassist.evaluation.results import SystemResult

log = logging.getLogger("medassist.evaluation.cache")
_ADAPTER_PARTS = ("lora_", ".modules_to_save.")  # PEFT's weights: unused while the adapter is disabled
# not what the model computes: training sets use_cache false, the engine asks for the cache itself
_VOLATILE_CONFIG = ("_name_or_path", "_commit_hash", "transformers_version", "use_cache")
MAX_ENTRIES = 200  # entries kept in the cache folder, the most recently used
_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "bert_score", "numpy", "safetensors")


def cache_dir() -> Path:
    """``$MEDASSIST_BASELINE_CACHE``, else ``baselines`` in medassist's cache (``$MEDASSIST_CACHE``)."""
    from medassist import presets

    explicit = os.environ.get("MEDASSIST_BASELINE_CACHE")
    return Path(explicit) if explicit else presets.cache_dir() / "baselines"


def _digest(*chunks: bytes | str) -> str:
    h = hashlib.blake2b(digest_size=20)
    for chunk in chunks:
        h.update(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
    return h.hexdigest()


def weights_digest(model) -> str:
    """A hash of the values, dtypes and shapes of the model's parameters and buffers, adapter weights excluded."""
    h = hashlib.blake2b(digest_size=20)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(part in name for part in _ADAPTER_PARTS):
            continue
        if tensor.is_meta:
            raise ValueError(f"{name} is on the meta device (offloaded): its values cannot be hashed")
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode("utf-8"))
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of every file of the installed medassist package (code and resources)."""
    import medassist

    root = Path(medassist.__file__).resolve().parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return _digest(*(part for p in files for part in (str(p.relative_to(root)), p.read_bytes())))


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """The distributions installed in site-packages (not what an import adds to ``sys.path``
    later: inductor adds setuptools' vendored packages), the versions of the libraries actually
    imported, Python, the CPU's model and flags: what changes numerics across machines."""
    import importlib
    import site

    folders = [f for f in [*site.getsitepackages(), site.getusersitepackages()] if Path(f).is_dir()]
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions(path=folders)
                   if d.metadata["Name"])
    loaded = {}
    for name in _LIBRARIES:
        try:
            loaded[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            loaded[name] = None
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
        cpu = " | ".join(next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")
                         for key in ("model name", "flags"))
    except OSError:
        pass
    return {"distributions": _digest("\n".join(dists)), "libraries": loaded, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": _digest(cpu)}


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _digest(vocab, str(getattr(tokenizer, "chat_template", None)), str(tokenizer.special_tokens_map))


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(values.items()) if isinstance(v, (str, int, float, bool, type(None)))}


def _path_stamp(name: str) -> Any:
    """A local model folder's files with sizes and times (a hub id or preset name stands for itself)."""
    path = Path(name)
    if not path.exists():
        return name
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [name, [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def _scoring_parts(examples: Sequence, scorer, factual) -> dict[str, Any]:
    """What every baseline's scores depend on: the examples, the scorers, the code and the machine."""
    return {
        "examples": _digest(json.dumps([[ex.question, ex.answer] for ex in examples])),
        "n_examples": len(examples),
        "bertscore": scorer.settings(),
        "factual": _path_stamp(getattr(factual, "name", str(factual))),
        "threads": torch.get_num_threads(),
        "code": code_digest(),
        "environment": environment(),
    }


def key_parts(base_lm, engine, examples: Sequence, settings, scorer, factual, passages, ppl: dict[str, Any]
              ) -> dict[str, Any]:
    """Everything the base model's scored answers depend on (``engine``: the base model's engine)."""
    from medassist.engine import model_device, stop_ids

    config = base_lm.config.to_dict()
    for key in _VOLATILE_CONFIG:
        config.pop(key, None)
    fmt = engine.fmt
    return {
        "weights": weights_digest(base_lm),
        "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "attention": str(getattr(base_lm.config, "_attn_implementation", None)),
        "compiled": any(getattr(m, "_compiled_call_impl", None) is not None for m in base_lm.modules()),
        "stop_ids": stop_ids(base_lm, fmt),
        "family": engine.family.name,
        "format": {"class": type(fmt).__qualname__, **_plain(vars(fmt))},
        "tokenizer": _tokenizer_digest(fmt.tokenizer),
        "prompts": _digest(json.dumps(engine.prompts([ex.question for ex in examples], passages))),
        "generation": settings.model_dump(mode="json"),
        "batching": engine.batching,
        "perplexity": {"batch_size": ppl["ppl_batch_size"], "dtype": str(ppl["ppl_dtype"])},
        "device": str(model_device(base_lm)),
        **_scoring_parts(examples, scorer, factual),
    }


def text_key_parts(name: str, examples: Sequence, scorer, factual, train: Sequence | None = None,
                   encoder: str | None = None) -> dict[str, Any]:
    """Everything a baseline that answers without a model depends on: ``repeat_question`` (the
    questions), ``nearest_training_answer`` (also the training rows searched, the groups that
    exclude candidates, and the encoder that compares the questions)."""
    parts = {"system": name, **_scoring_parts(examples, scorer, factual)}
    if train is not None:
        parts["train"] = _digest(json.dumps([[ex.question, ex.answer, ex.row, ex.group] for ex in train]))
        parts["groups"] = _digest(json.dumps([ex.group for ex in examples]))
        parts["encoder"] = _path_stamp(str(encoder))
    return parts


def open_entry(parts: Callable[[], dict[str, Any]], name: str) -> "BaselineCache | None":
    """The cache entry keyed by ``parts()``, or None where no key can be computed (weights
    offloaded to the meta device, an unusual tokenizer): the cache saves time and must never fail
    an evaluation, so any error here only turns it off for this baseline, with a warning."""
    try:
        return BaselineCache(parts())
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("%s: baseline cache not used for this evaluation: %s", name, str(exc).splitlines()[0][:160])
        return None


class BaselineCache:
    """One entry of the cache: :meth:`load` the stored result (None on a miss), :meth:`save` a new one.
    :attr:`info` says what happened, for the result's settings."""

    def __init__(self, parts: dict[str, Any]):
        self.parts = parts
        self.key = _digest(json.dumps(parts, sort_keys=True, default=str))
        self.path = cache_dir() / f"{self.key}.json"
        self.info: dict[str, Any] = {"key": self.key, "path": str(self.path), "hit": False}

    def load(self) -> SystemResult | None:
        started = time.perf_counter()
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            result = SystemResult.model_validate(stored["result"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a torn or foreign file: recompute
            log.warning("%s: unreadable cache entry, recomputing (%s)", self.path, str(exc).splitlines()[0][:120])
            return None
        self.info.update(hit=True, created=stored.get("created"), computed_timing=result.timing)
        try:
            os.utime(self.path)  # used now: the last to be pruned
        except OSError:
            pass
        result.timing = {"cache_load_seconds": time.perf_counter() - started}
        return result

    def save(self, result: SystemResult) -> None:
        entry = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "parts": self.parts,
                 "result": result.model_dump(mode="json")}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entry, default=str), encoding="utf-8")
            os.replace(tmp, self.path)  # atomic: a reader sees the whole entry or none
            self.info["saved"] = True
            self.info["pruned"] = prune(self.path.parent)
        except OSError as exc:  # a read-only home is no reason to fail an evaluation
            log.warning("%s: cannot write the cache entry (%s)", self.path, exc)
            self.info["saved"] = False


def prune(folder: Path, keep: int | None = None) -> int:
    """Delete all but the ``keep`` (default :data:`MAX_ENTRIES`) most recently used entries in
    ``folder``; returns how many were deleted. Files another process deletes first are skipped."""
    keep = MAX_ENTRIES if keep is None else keep
    entries = []
    for path in folder.glob("*.json"):
        try:
            entries.append((path.stat().st_mtime_ns, path.name, path))
        except OSError:
            continue
    deleted = 0
    for _, _, path in sorted(entries, reverse=True)[keep:]:
        try:
            path.unlink()
            deleted += 1
        except OSError:
            continue
    return deleted


def reuse_line(settings: dict[str, Any]) -> str | None:
    """What ``train`` and ``evaluate`` say when an evaluation's baselines came from the cache."""
    hits = {name: info for name, info in (settings.get("baseline_cache") or {}).items() if info.get("hit")}
    if not hits:
        return None
    folder = Path(next(iter(hits.values()))["path"]).parent
    created = sorted({str(info.get("created")) for info in hits.values()})
    return (f"baselines reused from the cache ({', '.join(hits)}): answers and scores from {folder} "
            f"(computed {', '.join(created)})")
