"""The report: verdicts first, a self-contained HTML page from the template with escaped text, plots."""

from __future__ import annotations

import json
import re

from medassist.data import QAExample
from medassist.evaluation import EvalResult, assemble, write_report
from medassist.evaluation.plots import load_metrics
from medassist.evaluation.results import DataInfo, SystemResult

PNG = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert('x')</script>"


def system(name: str, f1: list[float], factual: list[float], log_ppl: list[float] | None = None,
           texts: list[str] | None = None, cut: float | None = None) -> SystemResult:
    per = {"bertscore_f1": f1, "factual_consistency": factual}
    if log_ppl is not None:
        per["log_perplexity"] = log_ppl
    n = len(f1)
    return SystemResult(name=name, label=name, n_examples=n, bertscore_f1=sum(f1) / n,
                        factual_consistency=sum(factual) / n, perplexity=12.5 if log_ppl else None,
                        hit_max_new_tokens=cut, references_cut=3 if log_ppl else None, per_example=per,
                        generated=texts or [f"{name} answer {i}" for i in range(n)],
                        generated_tokens=[5] * n if log_ppl else [], hit_max_per_example=[False] * n if log_ppl else [])


def fake_result(n: int = 25, cut_share: float = 0.0) -> EvalResult:
    examples = [QAExample(f"Question {i}?", f"Reference answer {i}.", i + 1,
                          meta={"qtype": ("causes", "treatment")[i % 2], "source": "GHR"}) for i in range(n)]
    examples[3] = QAExample(f"{SCRIPT} & what?", "Reference 3.", 4, meta={"qtype": "causes"})
    texts = [f"Generated {i}." for i in range(n)]
    texts[4] = ""
    texts[2] = f"An answer with {SCRIPT} inside"
    f1 = [i / n for i in range(n)]
    model = system("model", f1, [0.5 + 0.01 * i for i in range(n)], [2.0] * n, texts, cut=cut_share)
    base = system("base_model", [v - 0.05 for v in f1], [0.5] * n, [2.3] * n)
    retrieval = system("nearest_training_answer", [v + 0.05 for v in f1], [0.5 + 0.01 * i for i in range(n)])
    repeat = system("repeat_question", [0.3] * n, [0.0] * n)
    result = assemble(examples, model, {"base_model": base, "nearest_training_answer": retrieval,
                                        "repeat_question": repeat},
                      data=DataInfo(source="data/x.csv", split="test", n_examples=n, train_overlap=2),
                      settings={"model": "runs/x", "family": "decoder", "prompt_format": "chat template",
                                "generation": {"max_new_tokens": 16, "do_sample": False},
                                "bertscore": {"model": "minilm-l6", "layer": 6, "idf": False,
                                              "rescale_with_baseline": False, "hash": "minilm_L6_no-idf",
                                              "note": "no rescaling baseline for 'minilm-l6'"}})
    return result


def write_metrics(path) -> None:
    records = [{"step": s, "epoch": s / 10, "loss": 3.0 - s / 10} for s in range(1, 21)]
    records += [{"step": 10 * e, "epoch": float(e), "eval_loss": 2.5 - e / 10} for e in (1, 2)]
    records += [{"step": 10 * e, "epoch": float(e), "eval_bertscore_f1": 0.4 + e / 20, "eval_perplexity": 20.0 - e,
                 "eval_token_accuracy": 0.3 + e / 50} for e in (1, 2)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")


def body_text(page: str) -> str:
    body = page.split("<body>", 1)[1]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)).strip()


def test_report_opens_with_the_verdicts_and_flags_the_retrieval_baseline(tmp_path):
    result = fake_result()
    page = write_report(result, tmp_path / "report", title="Run <x>").read_text(encoding="utf-8")
    text = body_text(page)
    first = text.split("yes / no:")[0]
    assert first.startswith("Run &lt;x&gt; Better than the base model: yes")
    assert "Better than the nearest training question&#39;s answer: no" in first
    assert "Better than repeating the question: yes" in first
    assert page.index('class="flag"') < page.index("Model minus baseline")
    assert "is not shown to beat answering with the answer of the nearest training question" in page
    assert result.comparison("base_model", "log_perplexity").verdict == "yes"
    assert "[+0.0500, +0.0500]" in page  # the interval of a constant difference
    # notes: cut references, training overlap, the encoder note
    assert "3 of 25 reference answers were longer than the length limit" in page
    assert "2 of the 25 evaluated questions also occur in the run" in page and "no rescaling baseline" in page


def test_report_is_self_contained_and_escapes_every_text(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    assert len(load_metrics(tmp_path / "metrics.jsonl")) == 24  # the bad line is skipped
    html_path = write_report(fake_result(), tmp_path / "report", tmp_path / "metrics.jsonl", title="Run <x>")
    folder = tmp_path / "report"
    for name in ("loss.png", "epoch_metrics.png", "f1_distribution.png", "differences.png"):
        assert (folder / name).read_bytes().startswith(PNG)
    page = html_path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"""(src|href)=["']?(https?:|//|[\w./-]+\.(png|css|js))""", page), "no external resources"
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; what?" in page  # a question
    assert "An answer with &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; inside" in page  # generated text
    assert "<title>Run &lt;x&gt;</title>" in page
    assert "10 best examples" in page and "10 worst examples" in page and "All 25 examples" in page
    assert page.count('<tr class="best">') == 10 and page.count('<tr class="worst">') == 10
    best_block = page.split("10 best examples")[1].split("10 worst examples")[0]
    assert best_block.index("Question 24?") < best_block.index("Question 23?")  # best first
    assert "(empty)" in page and "minilm_L6_no-idf" in page
    assert "By qtype" in page and "By source" in page
    lines = (folder / "examples.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 26 and "nearest_training_answer_answer" in lines[0] and "qtype" in lines[0]


def test_report_from_the_json_file_and_without_examples(tmp_path):
    result = fake_result(n=5, cut_share=0.5)
    data = result.to_json()
    json.dumps(data, allow_nan=False)
    again = EvalResult.from_json(data)  # what `eval_test.json` holds is enough to render the report
    page = write_report(again, tmp_path / "a").read_text(encoding="utf-8")
    assert not (tmp_path / "a" / "loss.png").exists() and (tmp_path / "a" / "f1_distribution.png").exists()
    assert "2 best examples" in page and "2 worst examples" in page and "ran into max_new_tokens" in page
    assert "Better than the base model: " in body_text(page)
    empty = assemble([], SystemResult(name="model", label="model", n_examples=0), {},
                     {"base_model": "the evaluated model is itself the base model"})
    page = write_report(empty, tmp_path / "b").read_text(encoding="utf-8")
    assert "No baseline was scored" in page
    assert "Better than the base model: not scored (the evaluated model is itself the base model)" in body_text(page)
