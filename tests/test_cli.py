"""The CLI: every command answers, and user errors are one line with exit status 2."""

import subprocess
import sys

import pytest

from medassist.cli import main


def _one_line_error(capsys, code, needle):
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and needle in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "minilm-l6", "minilm-bert2bert", "tiny-qwen3", "tiny-t5"):
        assert name in out
    assert "available" in out


def test_data_stats_counts(capsys, sample_csv):
    assert main(["data", "stats", str(sample_csv), "--model", "tiny-qwen3", "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "rows read: 105" in out and "duplicate_pair 4" in out and "empty_answer 2" in out
    assert "answers that would be truncated:" in out and "p50" in out


def test_tokens_shows_mask(capsys):
    assert main(["tokens", "--model", "tiny-qwen3", "--no-color", "--question", "Flu?", "--answer", "Rest."]) == 0
    out = capsys.readouterr().out
    assert "[[Rest]][[.]][[<|im_end|>]]" in out and "3 trained" in out


@pytest.mark.parametrize("argv,needle", [
    (["data", "stats", "missing.csv"], "missing.csv: file not found"),
    (["train", "--set", "data.path=nope.tsv", "--set", "model=tiny-qwen3"], "nope.tsv: file not found"),
    (["train", "--set", "lora.rnk=3"], "unknown config key 'lora.rnk'"),
    (["train", "no-such-config.yaml"], "no-such-config.yaml: config file not found"),
    (["data", "import-medquad", "/nonexistent/medquad", "--out", "x.csv"], "/nonexistent/medquad"),
])
def test_user_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, main(argv), needle)


def test_bad_column_names_the_column(capsys, tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,reply\nWhat?,That.\n")
    _one_line_error(capsys, main(["data", "stats", str(path)]), "missing column 'answer'")


def test_python_dash_m_and_help():
    out = subprocess.run([sys.executable, "-m", "medassist", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "models", "data", "tokens"):
        assert command in out.stdout
