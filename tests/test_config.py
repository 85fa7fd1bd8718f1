from pathlib import Path

import pytest

from medassist.config import TrainConfig, load_config, parse_overrides
from medassist.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model == "smollm2-135m" and cfg.lora.r == 16 and cfg.lora.alpha == 32
    assert cfg.data.validation_fraction == 0.05 and cfg.data.test_fraction == 0.05


def test_evaluation_decodes_32_answers_together_by_default():
    """32 rows is what met issue 14's 6x evaluation target with identical answers and 3.57 GiB peak."""
    from medassist.config import GenerationSettings

    default_recipe = load_config(Path(CONFIGS[0]).parent / "default.yaml")
    assert GenerationSettings().batch_size == load_config().eval.batch_size == default_recipe.eval.batch_size == 32


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    # a shipped recipe names its model and data explicitly
    assert "model:" in path.read_text()


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "qwen3-0.6b-lora.yaml"} <= names


def test_qwen_recipe_has_original_shape():
    cfg = load_config(Path(CONFIGS[0]).parent / "qwen3-0.6b-lora.yaml")
    assert (cfg.model, cfg.lora.r, cfg.lora.target_modules, cfg.max_length, cfg.epochs, cfg.batch_size) == (
        "Qwen/Qwen3-0.6B-Base", 64, "all-linear", 256, 3, 8)


def test_unknown_top_level_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny-qwen3\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'"):
        load_config(path)


def test_unknown_nested_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'"):
        load_config(None, ["lora.rank=8"])


def test_mistyped_value_names_key():
    with pytest.raises(ConfigError, match="'batch_size'"):
        load_config(None, ["batch_size=eight"])
    with pytest.raises(ConfigError, match="'data.validation_fraction'"):
        load_config(None, ["data.validation_fraction=1.5"])


def test_overrides_parse_yaml_scalars_but_not_yaml11_booleans():
    tree = parse_overrides(["lora.r=8", "eval_strategy=no", "lora.enabled=false", "learning_rate=1e-3"])
    assert tree == {"lora": {"r": 8, "enabled": False}, "eval_strategy": "no", "learning_rate": 1e-3}
    assert load_config(None, ["eval_strategy=no"]).eval_strategy == "no"


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["model"])


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model=tiny-qwen3", "lora.r=4", "data.group_column=focus"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_bertscore_best_model_needs_generation_metrics():
    with pytest.raises(ConfigError, match="bertscore_f1 needs eval.generation_metrics"):
        load_config(None, ["metric_for_best_model=bertscore_f1", "eval.generation_metrics=false"])
    assert load_config(None, ["metric_for_best_model=bertscore_f1"]).eval.subset > 0


def test_test_subset_is_bounded_and_seeded():
    from medassist.data import QAExample
    from medassist.training import _test_subset

    rows = [QAExample(f"q{i}", f"a{i}", i) for i in range(50)]
    cfg = load_config(None, ["eval.test_limit=10"])
    picked = _test_subset(rows, cfg)
    assert len(picked) == 10 and picked == _test_subset(rows, cfg)
    assert [r.row for r in picked] == sorted(r.row for r in picked)
    assert _test_subset(rows[:5], cfg) == rows[:5]


def test_default_recipe_trains_on_bundled_medquad_and_tests_on_an_unseen_collection():
    """`make train`'s recipe: real data on a fresh machine, whole collections held out (issue 12)."""
    from medassist.data import prepare_data, question_key

    cfg = load_config(Path(CONFIGS[0]).parent / "default.yaml")
    assert (cfg.model, cfg.data.path, cfg.data.holdout_column) == ("smollm2-135m", "medquad", "source")
    splits = prepare_data(cfg.data, cfg.seed).splits
    sources = {name: {ex.meta.get("source") for ex in rows} for name, rows in splits.items()}
    assert sources["test"] == set(cfg.data.test_values) and sources["validation"] == set(cfg.data.validation_values)
    assert not sources["train"] & (sources["test"] | sources["validation"])
    assert len(splits["train"]) > 5000 and len(splits["test"]) > cfg.eval.test_limit
    train_questions = {question_key(ex.question) for ex in splits["train"]}
    assert not any(question_key(ex.question) in train_questions for ex in splits["test"])
