"""``medassist doctor``: each way training and serving can disagree is caught, in one line that
names both values. (Exports are checked in test_gguf.py, where an export is at hand.)"""

from __future__ import annotations

import copy

import pytest

from medassist.config import TrainConfig
from medassist.export.chat import ChatShape
from medassist.export.doctor import Problem, check_run, eos_in_loss, mask_end, serve_prompt
from medassist.families import get_family
from medassist.formatting import IGNORE_INDEX
from medassist.models import LoadedModel, load_for_inference
from medassist.presets import CHATML_TEMPLATE

DECODER = get_family("decoder")


def test_a_good_format_has_no_problems(qwen_tokenizer, smollm2_tokenizer):
    for tok in (qwen_tokenizer, smollm2_tokenizer):
        fmt = DECODER.make_format(tok, TrainConfig(system_prompt="Be careful."))
        assert eos_in_loss(fmt) == [] and mask_end(fmt) == [] and serve_prompt(fmt, fmt) == []


def test_eos_masked_as_padding_is_caught(smollm2_tokenizer):
    """SmolLM2's pad token is its EOS; a collator that masks every pad id masks the EOS too."""
    fmt = DECODER.make_format(smollm2_tokenizer, TrainConfig())
    assert fmt.pad_id == fmt.eos_id == 2
    collate = fmt.collate

    def masks_pad_ids(features):  # what DataCollatorForLanguageModeling does
        batch = collate(features)
        batch["labels"][batch["input_ids"] == fmt.pad_id] = IGNORE_INDEX
        return batch

    fmt.collate = masks_pad_ids
    assert eos_in_loss(fmt) == [Problem("eos-masked", "the pad token '<|im_end|>' (2) equals the EOS '<|im_end|>' (2) "
                                                      "and the training batch labels it -100, not 2: the model never "
                                                      "learns to stop")]


def test_mask_not_ending_on_the_templates_end_of_turn_is_caught(qwen_base_tokenizer):
    """A base model's EOS (<|endoftext|>) with a ChatML template that ends turns with <|im_end|>:
    trained to stop where no chat runtime stops (the classic Qwen base-model bug)."""
    tok = copy.deepcopy(qwen_base_tokenizer)
    tok.chat_template = CHATML_TEMPLATE
    fmt = DECODER.make_format(tok, TrainConfig())
    assert mask_end(fmt) == [Problem("mask-end", "the answer-only mask ends on '<|endoftext|>' (151643), but the chat "
                                                 "template ends an assistant turn with '<|im_end|>' (151645)")]


def test_serve_prompt_differing_from_training_is_caught(smollm2_tokenizer, qwen_tokenizer):
    trained = DECODER.make_format(smollm2_tokenizer, TrainConfig())
    serve = trained.with_system_prompt("You are medassist.")
    (problem,) = serve_prompt(trained, serve)
    shape = ChatShape.of(trained)
    assert problem.check == "serve-prompt" and problem.message.startswith(
        "system prompt: training used none (the chat template writes its own: '<|im_start|>system\\nYou are a helpful")
    assert problem.message.endswith("serve uses 'You are medassist.'") and shape.no_system_prefix

    plain = DECODER.make_format(qwen_tokenizer, TrainConfig(prompt_format="plain"))
    chat = DECODER.make_format(qwen_tokenizer, TrainConfig())
    (problem,) = serve_prompt(plain, chat)
    assert problem.message.startswith("prompt template: training used the plain 'Question: … Answer:' format, serve "
                                      "uses the tokenizer's chat template (")


def test_check_run_on_a_loaded_model():
    loaded = load_for_inference("tiny-qwen3")

    def run(cfg: TrainConfig) -> LoadedModel:
        return LoadedModel(loaded.model, loaded.tokenizer, loaded.family, cfg, "run")

    assert check_run(run(TrainConfig(system_prompt="Trained."))) == []
    # a run trained without a system prompt is served without one (the template's default, as in training)
    assert check_run(run(TrainConfig())) == []
    # serve --system-prompt with another text than training is flagged, naming both values
    other = run(TrainConfig(system_prompt="You are medassist, a careful assistant.")).format()
    (problem,) = check_run(run(TrainConfig()), serve_fmt=other)
    assert problem.message.startswith("system prompt: training used none, serve uses 'You are medassist, a careful")


@pytest.mark.parametrize("args", [["doctor"], ["doctor", "--export"]])
def test_doctor_needs_a_path(args, capsys):
    from medassist.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


def test_generate_warns_when_the_served_prompt_differs_from_training(tmp_path, capsys):
    """``generate``/``chat``/``serve`` run the doctor's checks at start-up: a system prompt other
    than training's is one warning line on stderr, and the answer still comes."""
    from medassist.cli import main
    from medassist.rundir import RunDir

    loaded = load_for_inference("tiny-qwen3")
    run = RunDir(tmp_path / "run")
    loaded.model.save_pretrained(run.final)
    loaded.tokenizer.save_pretrained(run.final)
    run.config_file.write_text(TrainConfig(model="tiny-qwen3", system_prompt="Trained.").to_yaml(), encoding="utf-8")
    assert main(["generate", "--model", str(run.path), "--max-new-tokens", "2", "--system-prompt", "Other.",
                 "What is acne?"]) == 0
    err = capsys.readouterr().err
    assert "warning: serve-prompt: system prompt: training used 'Trained.', serve uses 'Other.'" in err
