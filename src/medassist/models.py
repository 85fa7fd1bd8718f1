"""Loading models: a preset (:mod:`medassist.presets`), any hub id or local folder, or a run
directory, loaded one way, with the family (:mod:`medassist.families`) that decides how the
model is used from there on.

:func:`load_pretrained` gives (model, tokenizer, family) in fp32 for training;
:func:`load_for_inference` a :class:`LoadedModel` in eval mode, ready to generate (a run's
``final/``, with its LoRA adapter merged into its base model by :func:`merge_adapter`, or an
exported folder with the training config it carries). A missing model is a
:class:`~medassist.errors.ModelError` that says which package or download it needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medassist.errors import ModelError
from medassist.families import DECODER, ENCODER, FAMILIES, ModelFamily, family_of, get_family
from medassist.presets import BUILDERS, PRESETS, Kind, require_available


def detect_kind(name_or_path: str) -> Kind:
    """What a preset, a run directory, or any hub id / folder is (from its config)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path].family
    from medassist.rundir import RunDir

    run = RunDir(Path(name_or_path))
    if run.config_file.is_file():
        cfg = run.config()
        return cfg.model_type or detect_kind(cfg.model)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - hub/IO errors become one line
        raise _missing(name_or_path, exc) from None
    return family_of(config).name


def _missing(name_or_path: str, exc: Exception) -> ModelError:
    if Path(name_or_path).exists():
        return ModelError(f"model '{name_or_path}': cannot load this folder ({type(exc).__name__}: {exc})"[:400])
    return ModelError(
        f"model '{name_or_path}' is not a preset ({', '.join(PRESETS)}), a local folder, or a hub model "
        "cached on this machine; download it with network access first (huggingface-cli download)"
    )


def _generator_family(name: str, kind: str) -> ModelFamily:
    if kind == ENCODER:
        raise ModelError(f"model '{name}' is an encoder (for BERTScore), not a generator; "
                         "pick a decoder or encoder-decoder model")
    return get_family(kind)


def load_pretrained(name_or_path: str, model_type: str | None = None) -> tuple[Any, Any, ModelFamily]:
    """Load (model, tokenizer, family) in fp32 from a preset, hub id or folder.

    ``model_type``: the family the caller expects; a model of another family is an error.
    """
    preset = PRESETS.get(name_or_path)
    kind = preset.family if preset is not None else None
    if preset is not None:
        require_available(preset)
        name_or_path = preset.hub_id or name_or_path
    kind = kind or detect_kind(name_or_path)
    family = _generator_family(name_or_path, kind)
    if model_type and model_type != family.name:
        raise ModelError(f"model_type: {model_type}, but '{name_or_path}' is a {family.name} model")
    if preset is not None and preset.name in BUILDERS:
        model, tok = BUILDERS[preset.name]()
        return model, tok, family
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = family.auto_class().from_pretrained(name_or_path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise _missing(name_or_path, exc) from None
    family.prepare(model, tok)
    return model, tok, family


@dataclass
class LoadedModel:
    """A model ready to generate: the model, its tokenizer, its family and, for runs, the config."""

    model: Any
    tokenizer: Any
    family: ModelFamily
    config: Any = None  # TrainConfig of the run, when loaded from a run directory
    source: str = ""

    def format(self, truncate_prompt: bool = True):
        """The formatter this model was trained with (the run's settings, else the defaults)."""
        return self.family.make_format(self.tokenizer, self.config, truncate_prompt=truncate_prompt)

    def engine(self, fmt=None):
        from medassist.engine import Engine

        return Engine(self.model, fmt or self.format(), self.family)


def load_for_inference(ref: str, merge: bool = True) -> LoadedModel:
    """Load a run directory (its ``final/``), one of its checkpoints, a preset, a hub id or a
    folder, in eval mode.

    A run's ``final/`` holds either a PEFT adapter (loaded on top of the run's base model) or a
    full model; a folder written by ``medassist export --merge`` is a plain model folder. An
    adapter is merged into the base weights (:func:`merge_adapter`) unless ``merge`` is False
    (the evaluation keeps it to score the base model with the adapter switched off first).
    """
    from transformers import AutoTokenizer

    from medassist.rundir import RunDir

    path = Path(ref)
    run = RunDir.find(ref)
    weights = run.final if run is not None else path
    if run is None:  # a checkpoint of a run: its weights, the run's prompts and lengths
        run = RunDir.of_checkpoint(path)
    if run is not None:
        cfg = run.config()
        if (weights / "adapter_config.json").is_file():
            from peft import PeftModel

            base, _, family = load_pretrained(cfg.model, cfg.model_type)
            model = PeftModel.from_pretrained(base, str(weights))
            model = merge_adapter(model) if merge else model
        else:
            model, _, family = load_pretrained(str(weights), cfg.model_type)
        tok = AutoTokenizer.from_pretrained(weights if (weights / "tokenizer_config.json").is_file() else run.final)
        model.eval()
        return LoadedModel(model, tok, family, cfg, source=str(path))
    if path.is_dir() and (path / "adapter_config.json").is_file():
        task = json.loads((path / "adapter_config.json").read_text()).get("task_type")
        family = next((f for f in FAMILIES.values() if f.peft_task_type == task), FAMILIES[DECODER])
        model = family.peft_auto_class().from_pretrained(str(path))
        model = merge_adapter(model) if merge else model
        model.eval()
        return LoadedModel(model, AutoTokenizer.from_pretrained(path), family, None, source=ref)
    model, tok, family = load_pretrained(ref)
    model.eval()
    return LoadedModel(model, tok, family, _export_config(path), source=ref)


def merge_adapter(model):
    """``model`` with its LoRA adapter merged into the base weights (PEFT's ``merge_and_unload``,
    in place, in the weights' dtype): the plain transformers model, as ``medassist export``
    ships it. Generation runs about 1.5x faster than with the adapter beside every linear
    (two more matmuls and PEFT's Python per linear and token; bench/RESULTS.md), with the
    same greedy answers to rounding. Any other model comes back as it is: PEFT gives
    ``merge_and_unload`` only to adapters with weights to merge (not to prompt-learning ones),
    and a plain model has none. The caller's adapter is gone: merge only a model nothing
    trains or evaluates with the adapter switched off afterwards."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def _export_config(folder: Path):
    """The training config a ``medassist export`` folder carries (prompt format, system prompt,
    lengths), so serving it builds the prompts it was trained with; None for other folders."""
    info = folder / "medassist_export.json"
    if not info.is_file():
        return None
    from medassist.config import TrainConfig

    try:
        return TrainConfig.model_validate(json.loads(info.read_text(encoding="utf-8"))["train_config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{info}: unreadable training config ({type(exc).__name__}); re-export the run") from None

