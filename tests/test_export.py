"""Export: merged LoRA models load with plain transformers and answer like base + adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from medassist import DISCLAIMER
from medassist.cli import main
from medassist.config import load_config
from medassist.families import FAMILIES
from medassist.models import load_for_inference, load_pretrained
from medassist.training import train

QUESTIONS = ["What are the symptoms of diabetes?", "How is asthma treated?", "What causes anemia?"]


def _train(out: Path, model: str, sample_csv: Path, **extra) -> Path:
    cfg = load_config(None, {
        "model": model, "max_steps": 4, "batch_size": 4, "learning_rate": 5e-2, "warmup_ratio": 0.0,
        "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "precision": "fp32",
        "report": False, "eval": {"generation_metrics": False}, "output_dir": str(out),
        "data": {"path": str(sample_csv), "limit": 40}, **extra})
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sample_csv) -> Path:
    return _train(tmp_path_factory.mktemp("lora") / "run", "tiny-qwen3", sample_csv)


def _greedy(model, tokenizer, family, cfg, max_new_tokens=12) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy answers to QUESTIONS and the logits of the first generation step."""
    fmt = FAMILIES[family].make_format(tokenizer, cfg)
    outputs, logits = [], []
    with torch.no_grad():
        for question in QUESTIONS:
            batch = fmt.collate_prompts([fmt.prompt_ids(question)])
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            outputs.append(out.sequences[0].tolist())
            logits.append(out.logits[0][0])
    return outputs, torch.stack(logits)


def test_merged_lora_loads_with_plain_transformers_and_matches_base_plus_adapter(lora_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = load_file(str(lora_run / "final" / "adapter_model.safetensors"))
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 1e-3, "adapter still zero: test would be vacuous"

    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--out", str(out), "--merge"]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "model.gguf").exists() and not (out / "Modelfile").exists()
    card = (out / "README.md").read_text()
    assert "Or serve it: `medassist serve --model PATH_OR_REPO_OF_THIS_FOLDER`." in card  # serve takes --model
    assert ModelCard.load(out / "README.md").data.library_name == "transformers"
    generation = json.loads((out / "generation_config.json").read_text())  # stops where serve stops
    assert generation["eos_token_id"] in (151645, [151645]) and generation["pad_token_id"] == 151643
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in k for k in merged.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(out)

    peft = load_for_inference(str(lora_run))
    cfg = peft.config
    want, want_logits = _greedy(peft.model, peft.tokenizer, "decoder", cfg)
    got, got_logits = _greedy(merged, tokenizer, "decoder", cfg)
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=1e-4, rtol=1e-4)
    base, base_tok, _ = load_pretrained("tiny-qwen3")
    _, base_logits = _greedy(base.eval(), base_tok, "decoder", cfg)
    assert (base_logits - want_logits).abs().max() > 1e-2, "the adapter changes nothing: test would be vacuous"


def test_adapter_export_records_its_base_and_has_a_model_card(lora_run, tmp_path):
    from peft import PeftModel

    out = tmp_path / "adapter"
    assert main(["export", str(lora_run), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
            "medassist_export.json"} <= names
    assert "training_args.bin" not in names  # a pickle is not shared
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-qwen3"
    info = json.loads((out / "medassist_export.json").read_text())
    assert info["kind"] == "adapter" and info["base_model"] == "tiny-qwen3"

    base, tok, _ = load_pretrained("tiny-qwen3")
    reloaded = PeftModel.from_pretrained(base, str(out)).eval()
    peft = load_for_inference(str(lora_run))
    assert _greedy(reloaded, tok, "decoder", peft.config)[0] == _greedy(peft.model, peft.tokenizer, "decoder",
                                                                        peft.config)[0]

    card = (out / "README.md").read_text()
    manifest = json.loads((lora_run / "data_manifest.json").read_text())
    summary = json.loads((lora_run / "train_summary.json").read_text())
    data = ModelCard.load(out / "README.md").data  # the header parses as the Hub parses it
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation" and "lora" in data.tags
    assert DISCLAIMER in card and "## Intended use and limits" in card
    assert "medassist serve" not in card  # an adapter is not served on its own
    assert "sample_medical_qa.csv" in card and f"Rows read: {manifest['rows_read']}" in card
    assert f"train {manifest['rows_per_split']['train']}" in card
    assert f"Steps: {summary['steps']}" in card and "Final train loss:" in card
    assert "model: tiny-qwen3" in card and "learning_rate: 0.05" in card  # the config, as YAML
    assert "LoRA (r=16, alpha=32" in card


def test_encoder_decoder_full_fine_tune_exports_a_plain_model(tmp_path, sample_csv, capsys):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = _train(tmp_path / "t5", "tiny-t5", sample_csv, learning_rate=3e-3)
    out = tmp_path / "t5-export"
    assert main(["export", str(run), "--out", str(out), "--merge"]) == 0
    assert "nothing to merge" in capsys.readouterr().err
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert ModelCard.load(out / "README.md").data.pipeline_tag == "text2text-generation"
    sep = AutoTokenizer.from_pretrained(out).sep_token_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] in (sep, [sep])
    plain = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    loaded = load_for_inference(str(run))
    want = _greedy(loaded.model, loaded.tokenizer, "encoder-decoder", loaded.config)[0]
    assert _greedy(plain, tokenizer, "encoder-decoder", loaded.config)[0] == want


def test_push_to_hub_without_token_is_one_line_and_writes_nothing(lora_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    out = tmp_path / "pushed"
    code = main(["export", str(lora_run), "--out", str(out), "--push-to-hub", "someone/medassist-test"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --push-to-hub needs a Hugging Face token: set HF_TOKEN in the environment or in a "
                   ".env file (export without --push-to-hub needs none)"]
    assert not out.exists()


def test_hub_token_is_read_from_dotenv(tmp_path, monkeypatch):
    from medassist.export import hub_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    (tmp_path / ".env").write_text("HF_TOKEN=hf_from_dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert hub_token() == "hf_from_dotenv"


def test_export_user_errors_are_one_line(lora_run, tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a finished medassist run (needs config.yaml and final/)"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    assert main(["export", str(lora_run), "--out", str(busy)]) == 2
    assert "exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(lora_run), "--out", str(busy), "--overwrite"]) == 0
    assert not (busy / "file").exists() and (busy / "README.md").exists()


def test_model_card_reports_test_scores_as_hub_eval_results(lora_run, tmp_path):
    from medassist.export.card import model_card
    from medassist.families import get_family
    from medassist.rundir import RunDir

    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir)
    (run_dir / "eval_test.json").write_text(json.dumps({
        "n_examples": 8, "bertscore_f1": 0.8123, "rouge_l": 0.21, "baselines": {"repeat": {"bertscore_f1": 0.5}}}))
    run = RunDir(run_dir)
    text = model_card(run, run.config(), "merged", "my-model", get_family("decoder"), gguf_type="q8_0",
                      system_prompt="Be careful.")
    card = ModelCard(text)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"bertscore_f1": 0.8123, "rouge_l": 0.21} and card.data.model_name == "my-model"
    assert "| bertscore_f1 | 0.8123 |" in text and "| bertscore_f1 of baseline 'repeat' | 0.5 |" in text
    assert "Test split (8 questions never seen in training)" in text
    assert '`model.gguf` (q8_0)' in text and "ollama create my-model -f Modelfile" in text
    assert 'system prompt: "Be careful."' in text and "gguf" in card.data.tags
