"""Export a run to a folder to share: the model, a model card, and optionally GGUF + Modelfile.

- LoRA run + ``merge``: the adapter is merged into its base (PEFT ``merge_and_unload``) and
  saved as a plain model that ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` loads with
  no PEFT and no medassist.
- LoRA run without ``merge``: the adapter and tokenizer, with the base model recorded in
  ``adapter_config.json`` (``base_model_name_or_path``) and in the card.
- full fine-tune (the encoder-decoder default): the model and tokenizer, copied.
- ``gguf_type`` (decoder-only): also ``model.gguf`` from the merged model and an Ollama
  ``Modelfile`` (:mod:`medassist.export.gguf`, :mod:`medassist.export.ollama`); implies merge.

Every model written gets a ``generation_config.json`` that stops where ``medassist serve``
stops, and every export is checked (:func:`medassist.export.doctor.check_export`) before it is
moved into place: an export whose stop tokens or template disagree with the tokenizer is never
written. Problems of the run itself (:func:`~medassist.export.doctor.check_run`) come back as
warnings. The folder is built beside ``out`` and renamed into place when complete; a full disk
is one clear error and leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medassist import DISCLAIMER, __version__
from medassist.errors import MedassistError
from medassist.rundir import RunDir

# files of final/ that are not shared: PEFT's template card (we write our own) and the pickled
# TrainingArguments (a pickle is code; the card carries the config as YAML instead)
_NOT_EXPORTED = {"README.md", "training_args.bin"}
EXPORT_INFO = "medassist_export.json"


class ExportError(MedassistError):
    """A run cannot be exported or uploaded; the message says why."""


@dataclass
class ExportResult:
    out: Path
    kind: str  # "merged" | "adapter" | "full"
    base_model: str
    gguf: Path | None = None
    modelfile: Path | None = None
    warnings: list = field(default_factory=list)  # doctor.Problem of the run (not of the export)
    pushed_to: str | None = None


def base_model_reference(model: str) -> tuple[str, str | None]:
    """(what to load the base with, its hub id when there is one) for a run's ``model``."""
    from medassist.presets import PRESETS

    preset = PRESETS.get(model)
    if preset is None:
        return model, (model if not Path(model).exists() else None)
    return (preset.hub_id or model), preset.hub_id


def _check_paths(run_dir: Path, out: Path, overwrite: bool) -> RunDir:
    run = RunDir.find(run_dir)
    if run is None:
        raise ExportError(f"{run_dir}: not a finished medassist run (needs config.yaml and final/)")
    if out.resolve() == run.path.resolve() or run.path.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out}: must be outside the run directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    return run


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False,
               gguf_type: str | None = None, log: Callable[[str], None] = lambda _m: None) -> ExportResult:
    """Write the shareable folder ``out`` from the run directory ``run_dir``.

    ``gguf_type`` (``f16``, ``bf16``, ``q8_0``): also write ``model.gguf`` and ``Modelfile``.
    """
    from medassist.export.gguf import GGUF_TYPES
    from medassist.families import get_family
    from medassist.models import detect_kind

    run_dir, out = Path(run_dir), Path(out)
    run = _check_paths(run_dir, out, overwrite)
    cfg = run.config()
    family = get_family(detect_kind(str(run.path)))
    if gguf_type is not None:
        if family.gguf_refusal:
            raise ExportError(f"--gguf: {family.gguf_refusal}")
        if gguf_type not in GGUF_TYPES:
            raise ExportError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
        if run.has_adapter and not merge:
            log("--gguf needs the merged model: merging the LoRA adapter")
            merge = True

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        result = _write(run, cfg, family, tmp, out.name, merge, gguf_type, log)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise _disk_error(exc, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.out = out
    result.gguf = out / "model.gguf" if result.gguf else None
    result.modelfile = out / "Modelfile" if result.modelfile else None
    return result


def _disk_error(exc: OSError, out: Path) -> ExportError:
    if exc.errno == errno.ENOSPC:
        return ExportError(f"--out {out}: no space left on device while writing the export "
                           "(nothing was written; free some space or choose another --out)")
    where = exc.filename or out
    return ExportError(f"--out {out}: cannot write {where} ({exc.strerror or exc})")


def _write(run: RunDir, cfg, family, tmp: Path, name: str, merge: bool, gguf_type: str | None,
           log: Callable[[str], None]) -> ExportResult:
    from medassist.export import doctor
    from medassist.export.card import model_card, shareable_config
    from medassist.models import load_for_inference

    is_adapter = run.has_adapter
    loaded = None
    if (is_adapter and merge) or gguf_type:
        log(f"merging the LoRA adapter of {run.path} into {cfg.model}" if is_adapter
            else f"loading the model of {run.path}")
        loaded = load_for_inference(str(run.path))  # an adapter merged into its base
        model = loaded.model
        fmt = loaded.format()
        stop_where_serve_stops(model.generation_config, fmt)
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        kind = "merged" if is_adapter else "full"
    else:
        if merge:
            log(f"{run.path} is a full fine-tune: nothing to merge, copying the model")
        for item in run.final.iterdir():
            if item.name not in _NOT_EXPORTED:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        kind = "adapter" if is_adapter else "full"
        if is_adapter:
            adapter_config = json.loads((tmp / "adapter_config.json").read_text())
            adapter_config["base_model_name_or_path"] = base_model_reference(cfg.model)[0]
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        elif (tmp / "generation_config.json").is_file():
            _align_saved_generation_config(tmp, family, cfg)

    system_prompt = None
    if gguf_type:
        system_prompt = _write_gguf_and_modelfile(loaded, tmp, name, gguf_type, log)
    elif loaded is not None:
        system_prompt = doctor.serve_format(loaded).system_prompt
    (tmp / EXPORT_INFO).write_text(json.dumps({
        "kind": kind, "base_model": cfg.model, "base_model_hub_id": base_model_reference(cfg.model)[1],
        "model_type": family.name, "run": run.name, "medassist_version": __version__,
        "gguf_type": gguf_type, "system_prompt": system_prompt,
        "train_config": json.loads(shareable_config(cfg).model_dump_json())}, indent=2))

    log("checking the export against the tokenizer")
    problems = doctor.check_export(tmp)
    if problems:
        raise ExportError("the export disagrees with its tokenizer (nothing was written): "
                          + "; ".join(p.message for p in problems))
    warnings = doctor.check_run(loaded if loaded is not None else run)
    (tmp / "README.md").write_text(model_card(run, cfg, kind, name, family, gguf_type, system_prompt),
                                   encoding="utf-8")
    return ExportResult(out=tmp, kind=kind, base_model=cfg.model, gguf=tmp / "model.gguf" if gguf_type else None,
                        modelfile=tmp / "Modelfile" if gguf_type else None, warnings=warnings)


def stop_where_serve_stops(generation_config, fmt) -> None:
    """Make ``generation_config`` stop where ``medassist serve`` stops (the formatter's EOS
    first, then every other EOS the model declares), so plain ``model.generate`` does too."""
    from types import SimpleNamespace

    from medassist.engine import stop_ids

    ids = stop_ids(SimpleNamespace(generation_config=generation_config), fmt)
    generation_config.eos_token_id = ids if len(ids) > 1 else ids[0]
    generation_config.pad_token_id = fmt.pad_id


def _align_saved_generation_config(folder: Path, family, cfg) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    generation_config = GenerationConfig.from_pretrained(folder)
    stop_where_serve_stops(generation_config, family.make_format(AutoTokenizer.from_pretrained(folder), cfg))
    generation_config.save_pretrained(folder)


def _write_gguf_and_modelfile(loaded, tmp: Path, name: str, gguf_type: str, log: Callable[[str], None]) -> str | None:
    from medassist.config import GenerationSettings, ServeConfig
    from medassist.engine import stop_ids
    from medassist.export import doctor
    from medassist.export.chat import ChatShape, training_template
    from medassist.export.gguf import GGUFPrompt, write_gguf
    from medassist.export.ollama import modelfile

    fmt = loaded.format()
    system_prompt = doctor.serve_format(loaded).system_prompt
    stops = tuple(stop_ids(loaded.model, fmt))
    prompt = GGUFPrompt(chat_template=training_template(fmt), eos_id=fmt.eos_id, pad_id=fmt.pad_id, stop_ids=stops,
                        add_bos=doctor.adds_bos(fmt), system_prompt=system_prompt)
    write_gguf(loaded.model, loaded.tokenizer, prompt, tmp / "model.gguf", gguf_type, name=name, progress=log)

    shape = ChatShape.of(fmt)
    tok = loaded.tokenizer
    stop_texts = [tok.decode([i], skip_special_tokens=False) for i in stops]
    opener = tok(shape.user_prefix, add_special_tokens=False).input_ids[:1] if shape.user_prefix else []
    if opener and opener[0] in tok.all_special_ids and opener[0] not in stops:
        stop_texts.append(tok.decode(opener, skip_special_tokens=False))  # a new turn: the model ran on
    serve = ServeConfig()
    generation = loaded.config.eval if loaded.config is not None else GenerationSettings()  # as evaluated
    parameters = {"temperature": f"{serve.temperature:g}", "top_p": f"{serve.top_p:g}",
                  "repeat_penalty": f"{generation.repetition_penalty:g}", "num_predict": str(serve.default_max_tokens)}
    header = f"Modelfile for {name}: written by medassist {__version__} from run {loaded.source or '?'}"
    modelfile(shape, system_prompt, stop_texts, parameters, name, DISCLAIMER, header).write(tmp)
    return system_prompt


# ---------------------------------------------------------------------------------------
# the hub
def hub_token() -> str | None:
    """``HF_TOKEN`` from the environment, or from a ``.env`` file (cwd or a parent)."""
    from dotenv import find_dotenv, load_dotenv

    path = find_dotenv(usecwd=True)
    if path:
        load_dotenv(path, override=False)  # the environment wins over the file
    return os.environ.get("HF_TOKEN") or None


def require_hub_token() -> str:
    token = hub_token()
    if not token:
        raise ExportError("--push-to-hub needs a Hugging Face token: set HF_TOKEN in the environment or in a "
                          ".env file (export without --push-to-hub needs none)")
    return token


def push_to_hub(folder: Path, repo_id: str, token: str, private: bool = False) -> str:
    """Create (if needed) the model repo ``repo_id`` and upload ``folder``; returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"Upload with medassist {__version__} export")
    except Exception as exc:  # noqa: BLE001 - network/auth/validation errors become one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"--push-to-hub {repo_id}: upload failed ({type(exc).__name__}: {first})"[:400]) from None
    return f"https://huggingface.co/{repo_id}"
