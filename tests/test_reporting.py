"""The report: PNG plots, a self-contained HTML page with escaped text, best and worst examples."""

from __future__ import annotations

import json
import re

from medassist.reporting import load_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_result(n: int = 25, cut_share: float = 0.0) -> dict:
    examples = [
        {"question": f"Question {i}?", "reference": f"Reference answer {i}.", "generated": f"Generated {i}.",
         "bertscore_f1": i / n, "bertscore_precision": i / n, "bertscore_recall": i / n, "rouge_l": 0.1,
         "generated_tokens": 5, "hit_max_new_tokens": False, "base_model_generated": f"base {i}",
         "base_model_bertscore_f1": 0.5}
        for i in range(n)
    ]
    examples[3]["question"] = "<script>alert('x')</script> & what?"
    examples[4]["generated"] = ""
    metrics = {"bertscore_precision": 0.5, "bertscore_recall": 0.5, "bertscore_f1": 0.48, "perplexity": 12.5,
               "token_accuracy": 0.4, "rouge_l": 0.1, "mean_generated_tokens": 5.0, "hit_max_new_tokens": cut_share}
    return {
        **metrics, "n_examples": n, "examples": examples,
        "baselines": {"base_model": {**metrics, "bertscore_f1": 0.5},
                      "repeat_question": {**metrics, "bertscore_f1": 0.3, "perplexity": None, "token_accuracy": None}},
        "settings": {"model": "runs/x", "family": "decoder", "prompt_format": "chat template",
                     "generation": {"max_new_tokens": 16, "do_sample": False},
                     "bertscore": {"model": "minilm-l6", "layer": 6, "idf": False, "rescale_with_baseline": False,
                                   "hash": "minilm_L6_no-idf", "note": "no rescaling baseline for 'minilm-l6'"},
                     "data": {"source": "data/x.csv", "split": "test"}},
    }


def write_metrics(path) -> None:
    records = [{"step": s, "epoch": s / 10, "loss": 3.0 - s / 10} for s in range(1, 21)]
    records += [{"step": 10 * e, "epoch": float(e), "eval_loss": 2.5 - e / 10} for e in (1, 2)]
    records += [{"step": 10 * e, "epoch": float(e), "eval_bertscore_f1": 0.4 + e / 20, "eval_perplexity": 20.0 - e,
                 "eval_token_accuracy": 0.3 + e / 50} for e in (1, 2)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")


def test_report_files_plots_and_self_contained_html(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    assert len(load_metrics(tmp_path / "metrics.jsonl")) == 24  # the bad line is skipped
    html_path = write_report(fake_result(), tmp_path / "report", tmp_path / "metrics.jsonl", title="Run <x>")
    folder = tmp_path / "report"
    for name in ("loss.png", "epoch_metrics.png", "f1_distribution.png"):
        assert (folder / name).read_bytes().startswith(PNG)
    page = html_path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"""(src|href)=["']?(https?:|//|[\w./-]+\.(png|css|js))""", page), "no external resources"
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; what?" in page
    assert "Run &lt;x&gt;" in page
    assert "10 best examples" in page and "10 worst examples" in page and "All 25 examples" in page
    assert page.count("class='best'") == 10 and page.count("class='worst'") == 10
    assert "(empty)" in page and "no rescaling baseline" in page and "minilm_L6_no-idf" in page
    assert (folder / "examples.csv").read_text(encoding="utf-8").count("\n") >= 26
    best_block = page.split("10 best examples")[1].split("10 worst examples")[0]
    assert best_block.index("Question 24?") < best_block.index("Question 23?")  # best first


def test_report_without_metrics_or_examples(tmp_path):
    result = fake_result(n=5, cut_share=0.5)
    page = write_report(result, tmp_path / "a").read_text(encoding="utf-8")
    assert not (tmp_path / "a" / "loss.png").exists() and (tmp_path / "a" / "f1_distribution.png").exists()
    assert "2 best examples" in page and "2 worst examples" in page and "ran into max_new_tokens" in page
    empty = dict(result, examples=[], n_examples=0)
    assert write_report(empty, tmp_path / "b").is_file()
