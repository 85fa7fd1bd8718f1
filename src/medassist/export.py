"""Export: turn a run directory into a folder to share, with a model card.

``medassist export RUN --out DIR [--merge] [--push-to-hub REPO_ID]``

- LoRA run + ``--merge``: the adapter is merged into its base (PEFT ``merge_and_unload``) and
  saved as a plain model that ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` loads
  with no PEFT and no medassist.
- LoRA run without ``--merge``: the adapter and tokenizer, with the base model recorded in
  ``adapter_config.json`` (``base_model_name_or_path``) and in the card.
- full fine-tune (the encoder-decoder default): the model and tokenizer, copied.

Every export gets ``README.md``: a model card with the base model, the data file and its row
counts, the config, the run's metrics, and the intended use and limits. ``--push-to-hub``
uploads the folder with ``huggingface_hub`` when ``HF_TOKEN`` is set (in the environment or a
``.env`` file); nothing else in medassist needs a token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from medassist import __version__
from medassist.errors import MedassistError
from medassist.families import DECODER, get_family

# files of final/ that are not shared: PEFT's template card (we write our own) and the pickled
# TrainingArguments (a pickle is code; the card carries the config as YAML instead)
_NOT_EXPORTED = {"README.md", "training_args.bin"}
DISCLAIMER = (
    "This model is **not medical advice** and not a medical device. It can state wrong, outdated or "
    "harmful things fluently. Do not use it to diagnose, treat or triage anyone; a qualified "
    "professional must check anything it says before it informs a decision about a person's health."
)


class ExportError(MedassistError):
    """A run cannot be exported or uploaded; the message says why."""


@dataclass
class ExportResult:
    out: Path
    kind: str  # "merged" | "adapter" | "full"
    base_model: str
    pushed_to: str | None = None


# ---------------------------------------------------------------------------------------
# the run
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def base_model_reference(model: str) -> tuple[str, str | None]:
    """(what to load the base with, its hub id when there is one) for a run's ``model``."""
    from medassist.models import PRESETS

    preset = PRESETS.get(model)
    if preset is None:
        return model, (model if not Path(model).exists() else None)
    return (preset.hub_id or model), preset.hub_id


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False,
               log: Callable[[str], None] = lambda _m: None) -> ExportResult:
    """Write the shareable folder ``out`` from the run directory ``run_dir``.

    The folder is built beside ``out`` and renamed into place when complete.
    """
    from medassist.config import load_config

    run_dir, out = Path(run_dir), Path(out)
    final = run_dir / "final"
    if not (run_dir / "config.yaml").is_file() or not final.is_dir():
        raise ExportError(f"{run_dir}: not a finished medassist run (needs config.yaml and final/)")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out}: must be outside the run directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    cfg = load_config(run_dir / "config.yaml")
    is_adapter = (final / "adapter_config.json").is_file()
    load_ref, hub_id = base_model_reference(cfg.model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if is_adapter and merge:
            from medassist.models import load_for_inference

            log(f"merging the LoRA adapter of {run_dir} into {cfg.model}")
            loaded = load_for_inference(str(run_dir))
            merged = loaded.model.merge_and_unload()
            merged.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            kind = "merged"
        else:
            if merge:
                log(f"{run_dir} is a full fine-tune: nothing to merge, copying the model")
            for item in final.iterdir():
                if item.name in _NOT_EXPORTED:
                    continue
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            kind = "adapter" if is_adapter else "full"
            if is_adapter:
                adapter_config = json.loads((tmp / "adapter_config.json").read_text())
                adapter_config["base_model_name_or_path"] = load_ref
                (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        (tmp / "medassist_export.json").write_text(json.dumps({
            "kind": kind, "base_model": cfg.model, "base_model_hub_id": hub_id, "model_type": cfg.model_type,
            "run": run_dir.name, "medassist_version": __version__}, indent=2))
        (tmp / "README.md").write_text(model_card(run_dir, cfg, kind, out.name), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out=out, kind=kind, base_model=cfg.model)


# ---------------------------------------------------------------------------------------
# model card
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def model_card(run_dir: Path, cfg, kind: str, name: str) -> str:
    """README.md for the export: what it is, what it was trained on, how it scored, its limits."""
    manifest = _read_json(run_dir / "data_manifest.json") or {}
    summary = _read_json(run_dir / "train_summary.json") or {}
    test = _read_json(run_dir / "eval_test.json")
    _, hub_id = base_model_reference(cfg.model)
    family = get_family(cfg.model_type or DECODER)
    front = {
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": family.pipeline_tag,
        "tags": ["medassist", "medical", "question-answering"] + (["lora"] if kind != "full" else []),
    }
    if hub_id:
        front["base_model"] = hub_id
    method = (f"LoRA (r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, "
              f"targets {cfg.lora.target_modules})" if kind != "full" else "full fine-tuning")
    shipped = {"merged": "the LoRA adapter merged into the base weights: a plain transformers model",
               "adapter": "the LoRA adapter only; load it on top of the base model",
               "full": "the fine-tuned model"}[kind]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"A medical question-answering model fine-tuned with medassist {__version__} "
             f"from `{cfg.model}`{f' ({hub_id})' if hub_id and hub_id != cfg.model else ''}.", "",
             "## Model", "",
             f"- Base model: `{cfg.model}`" + (f" (`{hub_id}`)" if hub_id and hub_id != cfg.model else ""),
             f"- Family: {family.name}; method: {method}",
             f"- This folder holds {shipped}.",
             f"- Prompt format: {cfg.prompt_format}" + (f"; system prompt: {cfg.system_prompt!r}" if cfg.system_prompt else ""),
             ""]
    if cfg.model == "smollm2-135m":
        lines += ["Note: medassist's `smollm2-135m` is HuggingFaceTB/SmolLM2-135M-Instruct dequantized from its "
                  "GGUF Q4_1 file, so its weights differ slightly from the hub's original; an adapter is exact "
                  "only on the same base (prefer `--merge` for sharing).", ""]
    lines += ["## Data", ""]
    if manifest:
        dropped = ", ".join(f"{k} {v}" for k, v in (manifest.get("dropped") or {}).items()) or "none"
        splits = manifest.get("rows_per_split") or {}
        lines += [f"- File: `{Path(str(manifest.get('source', cfg.data.path))).name}` "
                  f"(sha256 `{str(manifest.get('sha256', ''))[:16]}…`)",
                  f"- Rows read: {manifest.get('rows_read')}; kept: {manifest.get('rows_kept')}; dropped: {dropped}",
                  f"- Split by question group (seed {manifest.get('seed')}): "
                  + ", ".join(f"{k} {v}" for k, v in splits.items()),
                  ""]
    else:
        lines += [f"- File: `{cfg.data.path}` (no data manifest in the run)", ""]
    lines += ["## Training", ""]
    if summary:
        lines += [f"- Steps: {summary.get('steps')}; epochs: {_fmt(summary.get('epochs'))}; "
                  f"precision: {summary.get('precision')}; processes: {summary.get('world_size', 1)}",
                  f"- Train examples: {summary.get('train_examples')}; answer tokens trained on: "
                  f"{summary.get('supervised_tokens')}",
                  f"- Final train loss: {_fmt(summary.get('final_train_loss'))}; validation loss: "
                  f"{_fmt(summary.get('final_validation_loss'))}; validation perplexity: "
                  f"{_fmt(summary.get('final_validation_perplexity'))}",
                  ""]
    # local paths say nothing to a reader and may say too much about the machine: names only
    shared_cfg = cfg.model_copy(update={"output_dir": Path(cfg.output_dir).name})
    shared_cfg.data = cfg.data.model_copy(update={"path": Path(cfg.data.path).name})
    lines += ["<details><summary>Full training config</summary>", "", "```yaml", shared_cfg.to_yaml().strip(), "```",
              "", "</details>", "", "## Evaluation", ""]
    if test:
        keys = ["bertscore_f1", "rouge_l", "perplexity", "token_accuracy"]
        lines += [f"Test split ({test.get('n_examples', (test.get('settings') or {}).get('data', {}).get('n_examples', '?'))} "
                  "questions never seen in training):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(test[k])} |" for k in keys if isinstance(test.get(k), (int, float))]
        for label, base in (test.get("baselines") or {}).items():
            if isinstance(base, dict) and isinstance(base.get("bertscore_f1"), (int, float)):
                lines.append(f"| bertscore_f1 of baseline '{label}' | {_fmt(base['bertscore_f1'])} |")
        lines += ["", "BERTScore and ROUGE measure closeness to reference answers, not clinical correctness.", ""]
    else:
        lines += ["No test-split evaluation was run for this model (`report: false`); see the validation loss "
                  "above, or run `medassist evaluate`.", ""]
    lines += ["## How to use", "", "```python"]
    auto = family.auto_class_name
    if kind == "adapter":
        lines += ["from peft import PeftModel",
                  "from medassist.models import load_pretrained  # or transformers' Auto* for a hub base model",
                  "",
                  f"base, tokenizer, _ = load_pretrained({cfg.model!r})",
                  "model = PeftModel.from_pretrained(base, 'PATH_OR_REPO_OF_THIS_FOLDER')"]
    else:
        lines += [f"from transformers import AutoTokenizer, {auto}", "",
                  "tokenizer = AutoTokenizer.from_pretrained('PATH_OR_REPO_OF_THIS_FOLDER')",
                  f"model = {auto}.from_pretrained('PATH_OR_REPO_OF_THIS_FOLDER')"]
    lines += ["```", ""]
    if kind != "adapter":
        lines += ["Or serve it: `medassist serve PATH_OR_REPO_OF_THIS_FOLDER`.", ""]
    lines += ["## Intended use and limits", "",
              DISCLAIMER, "",
              "- Intended for research, teaching and building prototypes of medical question answering.",
              f"- Trained on {summary.get('train_examples', 'a few')} question/answer pairs"
              f"{' for ' + str(summary.get('steps')) + ' steps' if summary.get('steps') else ''}: "
              "it knows only what the base model and this data taught it, and reproduces their gaps and biases.",
              "- Answers are not grounded in sources and are not checked against current guidelines.",
              "- The base model's licence and use policy apply, as does the licence of the training data.",
              ""]
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------------------
# CLI
def cmd_export(args: argparse.Namespace) -> int:
    import sys

    token = require_hub_token() if args.push_to_hub else None  # fail before the work, not after

    def say(message: str) -> None:
        print(f"medassist: {message}", file=sys.stderr, flush=True)

    result = export_run(args.run, args.out, merge=args.merge, overwrite=args.overwrite, log=say)
    print(f"exported {result.kind} model to {result.out} (model card: {result.out / 'README.md'})")
    if args.push_to_hub:
        url = push_to_hub(result.out, args.push_to_hub, token, private=args.private)
        print(f"uploaded to {url}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="package a run to share: merged model or adapter, with a model card",
        description="Write a run's final model to a folder with a model card (README.md); optionally "
                    "merge a LoRA adapter into its base and upload to the Hugging Face Hub.")
    p.add_argument("run", help="run directory (holds config.yaml and final/)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--merge", action="store_true",
                   help="merge a LoRA adapter into the base model (loads with plain transformers)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload to this Hub repo (needs HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=cmd_export)
