"""The model card (README.md) of an export, built with ``huggingface_hub.ModelCard``.

The metadata header is a :class:`~huggingface_hub.ModelCardData` (library, pipeline tag from
the model family, base model, tags, and the test-split scores as ``model-index`` results, which
the Hub shows beside the model); the body is the Jinja template below, filled from the run
directory (:class:`~medassist.rundir.RunDir`): base model, data file and row counts, training
summary, config, scores, how to use it, and the intended use and limits with
:data:`medassist.DISCLAIMER`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medassist import DISCLAIMER, __version__
from medassist.rundir import RunDir

SCORES = ("bertscore_f1", "rouge_l", "perplexity", "token_accuracy")
TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

A medical question-answering model fine-tuned with medassist {{ version }} from `{{ base }}`{{ hub_note }}.

## Model

- Base model: `{{ base }}`{{ hub_note }}
- Family: {{ family }}; method: {{ method }}
- This folder holds {{ shipped }}.
- Prompt format: {{ prompt_format }}{% if system_prompt %}; system prompt: {{ system_prompt | tojson }}{% endif %}
{% if base == "smollm2-135m" %}
Note: medassist's `smollm2-135m` is HuggingFaceTB/SmolLM2-135M-Instruct dequantized from its GGUF Q4_1 file, so its
weights differ slightly from the hub's original; an adapter is exact only on the same base (prefer `--merge` for sharing).
{% endif %}
## Data

{% if manifest %}- File: `{{ manifest.file }}` (sha256 `{{ manifest.sha256 }}…`)
- Rows read: {{ manifest.rows_read }}; kept: {{ manifest.rows_kept }}; dropped: {{ manifest.dropped }}
- Split by question group (seed {{ manifest.seed }}): {{ manifest.splits }}
{% else %}- File: `{{ data_file }}` (no data manifest in the run)
{% endif %}
## Training
{% if summary %}
- Steps: {{ summary.steps }}; epochs: {{ summary.epochs }}; precision: {{ summary.precision }}; processes: {{ summary.world_size }}
- Train examples: {{ summary.train_examples }}; answer tokens trained on: {{ summary.supervised_tokens }}
- Final train loss: {{ summary.final_train_loss }}; validation loss: {{ summary.final_validation_loss }}; validation perplexity: {{ summary.final_validation_perplexity }}
{% endif %}
<details><summary>Full training config</summary>

```yaml
{{ config_yaml }}
```

</details>

## Evaluation

{% if scores %}Test split ({{ n_test }} questions never seen in training):

| metric | value |
|---|---|
{% for metric, value in scores %}| {{ metric }} | {{ value }} |
{% endfor %}
BERTScore and ROUGE measure closeness to reference answers, not clinical correctness.
{% else %}No test-split evaluation was run for this model (`report: false`); see the validation loss above, or run
`medassist evaluate`.
{% endif %}
## How to use

```python
{% if kind == "adapter" %}from peft import PeftModel
from medassist.models import load_pretrained  # or transformers' Auto* for a hub base model

base, tokenizer, _ = load_pretrained({{ base | tojson }})
model = PeftModel.from_pretrained(base, 'PATH_OR_REPO_OF_THIS_FOLDER')
{% else %}from transformers import AutoTokenizer, {{ auto_class }}

tokenizer = AutoTokenizer.from_pretrained('PATH_OR_REPO_OF_THIS_FOLDER')
model = {{ auto_class }}.from_pretrained('PATH_OR_REPO_OF_THIS_FOLDER')
{% endif %}```
{% if kind != "adapter" %}
Or serve it: `medassist serve --model PATH_OR_REPO_OF_THIS_FOLDER`.
{% endif %}{% if gguf_type %}
### llama.cpp and Ollama

`model.gguf` ({{ gguf_type }}) carries the weights, the tokenizer, the chat template the model was trained with and its
stop tokens; `Modelfile` adds the system prompt and `medassist serve`'s decoding defaults for Ollama:

```sh
ollama create {{ name }} -f Modelfile
ollama run {{ name }} "What are the symptoms of anemia?"
```
{% endif %}
## Intended use and limits

{{ disclaimer }}

- Intended for research, teaching and building prototypes of medical question answering.
- Trained on {{ summary.train_examples or "a few" }} question/answer pairs{% if summary.steps %} for {{ summary.steps }} steps{% endif %}: it knows only what the base model and this data taught it, and reproduces their gaps and biases.
- Answers are not grounded in sources and are not checked against current guidelines.
- The base model's licence and use policy apply, as does the licence of the training data.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _eval_results(test: dict[str, Any], family, data_file: str):
    from huggingface_hub import EvalResult

    return [EvalResult(task_type=family.pipeline_tag, dataset_type="medassist-test-split", dataset_name=data_file,
                       dataset_split="test", metric_type=metric, metric_value=float(test[metric]))
            for metric in SCORES if isinstance(test.get(metric), (int, float))]


def model_card(run: RunDir, cfg, kind: str, name: str, family, gguf_type: str | None = None,
               system_prompt: str | None = None) -> str:
    """README.md for the export: what it is, what it was trained on, how it scored, its limits."""
    from huggingface_hub import ModelCard, ModelCardData

    from medassist.export.hf import base_model_reference

    manifest, summary, test = run.manifest() or {}, run.summary() or {}, run.read_json(run.eval_file("test"))
    _, hub_id = base_model_reference(cfg.model)
    data_file = Path(str(manifest.get("source", cfg.data.path))).name
    tags = ["medassist", "medical", "question-answering"] + (["lora"] if kind != "full" else [])
    tags += ["gguf", "ollama"] if gguf_type else []
    results = _eval_results(test, family, data_file) if test else []
    card_data = ModelCardData(library_name="peft" if kind == "adapter" else "transformers",
                              pipeline_tag=family.pipeline_tag, tags=tags, base_model=hub_id,
                              model_name=name, eval_results=results or None)
    scores = [(metric, _fmt(test[metric])) for metric in SCORES if isinstance((test or {}).get(metric), (int, float))]
    for label, base in ((test or {}).get("baselines") or {}).items():
        if isinstance(base, dict) and isinstance(base.get("bertscore_f1"), (int, float)):
            scores.append((f"bertscore_f1 of baseline '{label}'", _fmt(base["bertscore_f1"])))
    method = (f"LoRA (r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, "
              f"targets {cfg.lora.target_modules})" if kind != "full" else "full fine-tuning")
    shipped = {"merged": "the LoRA adapter merged into the base weights: a plain transformers model",
               "adapter": "the LoRA adapter only; load it on top of the base model",
               "full": "the fine-tuned model"}[kind] + (", and `model.gguf` + `Modelfile` for llama.cpp and Ollama"
                                                       if gguf_type else "")
    card = ModelCard.from_template(
        card_data, template_str=TEMPLATE, name=name, version=__version__, base=cfg.model,
        hub_note=f" (`{hub_id}`)" if hub_id and hub_id != cfg.model else "", family=family.name, method=method,
        shipped=shipped, prompt_format=cfg.prompt_format, system_prompt=system_prompt or cfg.system_prompt,
        manifest=_manifest_view(manifest) if manifest else None, data_file=data_file,
        summary={"world_size": 1, **{k: _fmt(v) if k.startswith(("final", "epochs")) else v for k, v in summary.items()}},
        config_yaml=shareable_config(cfg).to_yaml().strip(), scores=scores,
        n_test=(test or {}).get("n_examples", ((test or {}).get("settings") or {}).get("data", {}).get("n_examples", "?")),
        kind=kind, auto_class=family.auto_class_name, gguf_type=gguf_type, disclaimer=DISCLAIMER)
    return str(card)


def shareable_config(cfg):
    """The training config with local paths cut to names: a path says nothing to a reader and may
    say too much about the machine."""
    shared = cfg.model_copy(update={"output_dir": Path(cfg.output_dir).name})
    shared.data = cfg.data.model_copy(update={"path": Path(cfg.data.path).name})
    return shared


def _manifest_view(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"file": Path(str(manifest.get("source", ""))).name, "sha256": str(manifest.get("sha256", ""))[:16],
            "rows_read": manifest.get("rows_read"), "rows_kept": manifest.get("rows_kept"),
            "dropped": ", ".join(f"{k} {v}" for k, v in (manifest.get("dropped") or {}).items()) or "none",
            "seed": manifest.get("seed"),
            "splits": ", ".join(f"{k} {v}" for k, v in (manifest.get("rows_per_split") or {}).items())}
