"""GGUF and Ollama export: the round trip back through transformers' GGUF loader, the chat
template carried to the GGUF and (as Go) to the Modelfile, the stop tokens, and bad inputs.

Runs are made by hand (a LoRA adapter with random, non-zero weights on a preset, and a
config.yaml), which is all ``export`` reads; training is tested elsewhere.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from medassist.cli import main
from medassist.engine import stop_ids
from medassist.export.chat import PLAIN_CHAT_TEMPLATE, ChatShape, TemplateError, training_template
from medassist.export.gguf import GGUFError, GGUFPrompt, alone, read_metadata, tensor_types, write_gguf
from medassist.export.ollama import Modelfile, go_template
from medassist.families import get_family
from medassist.models import load_for_inference, load_pretrained

QUESTIONS = ["What are the symptoms of diabetes?", "How is asthma treated?", "What causes anemia?",
             "Is 120/80 mmHg a normal blood pressure?"]
SYSTEM = "Answer as a careful clinician would, and say when you are unsure."


def make_run(path: Path, model: str, lora_alpha: int = 16, **config) -> Path:
    """A finished LoRA run: a random adapter (seeded, B not zero) and its config."""
    import peft

    base, tokenizer, family = load_pretrained(model)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        adapter = peft.get_peft_model(base, peft.LoraConfig(
            r=8, lora_alpha=lora_alpha, target_modules="all-linear", init_lora_weights=False,
            task_type=family.peft_task_type))
    adapter.save_pretrained(path / "final")
    tokenizer.save_pretrained(path / "final")
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, **config}))
    return path


def greedy(model, fmt, max_new_tokens: int = 16) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for question in QUESTIONS:
            ids = torch.tensor([fmt.prompt_ids(question)])
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=fmt.eos_id, pad_token_id=fmt.pad_id)
            out.append(new[0, ids.shape[1]:].tolist())
    return out


def agreement(model, reference, fmt, answers: list[list[int]]) -> float:
    """Top-1 agreement of ``model`` with ``reference`` on the reference's own answers (teacher forced)."""
    same = total = 0
    with torch.no_grad():
        for question, answer in zip(QUESTIONS, answers):
            ids = torch.tensor([fmt.prompt_ids(question) + answer])
            start = ids.shape[1] - len(answer) - 1
            a = model(ids).logits[0, start:-1].argmax(-1)
            b = reference(ids).logits[0, start:-1].argmax(-1)
            same, total = same + int((a == b).sum()), total + len(answer)
    return same / max(total, 1)


def rounded(model, dtype):
    """A copy of ``model`` whose weights are those of ``dtype``, computed in fp32."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            if p.dim() > 1:
                p.copy_(p.to(dtype).float())
    return twin


def load_gguf(folder: Path, config=None):
    """transformers' GGUF loaders on ``folder/model.gguf`` alone (nothing beside it to read instead)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with alone(folder / "model.gguf") as only:
        model = AutoModelForCausalLM.from_pretrained(only, gguf_file="model.gguf", dtype=torch.float32,
                                                     **({"config": config} if config else {})).eval()
        return model, AutoTokenizer.from_pretrained(only, gguf_file="model.gguf")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A run on a tiny random Llama with SmolLM2's tokenizer and chat template (and no system
    prompt: the template writes its own default system turn, serve sends its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return make_run(tmp_path_factory.mktemp("llama") / "run", str(folder))


@pytest.fixture(scope="module")
def llama_export(llama_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "medassist-llama"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["export", str(llama_run), "--out", str(out), "--merge", "--gguf"])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("qwen") / "run", "tiny-qwen3", system_prompt=SYSTEM)


@pytest.fixture(scope="module")
def qwen_export(qwen_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "medassist-qwen"
    assert main(["export", str(qwen_run), "--out", str(out), "--gguf"]) == 0  # --gguf alone: merges, f16
    return out


def merged_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------
# the round trip
def test_llama_f16_gguf_round_trip_gives_the_merged_models_tokens(llama_export, llama_run):
    out, _ = llama_export
    model = merged_model(out)
    run = load_for_inference(str(llama_run))
    fmt = run.format()
    gguf_model, gguf_tok = load_gguf(out)

    # the weights are the merged ones at f16, exactly (Q/K rows permuted there and back)
    state = model.state_dict()
    for name, tensor in gguf_model.state_dict().items():
        want = state[name].to(torch.float16).float() if state[name].dim() > 1 else state[name]
        assert torch.equal(tensor, want), name
    # the GGUF's tokenizer and template build the prompts training built
    gguf_fmt = get_family("decoder").make_format(gguf_tok, run.config)
    assert [gguf_fmt.prompt_ids(q) for q in QUESTIONS] == [fmt.prompt_ids(q) for q in QUESTIONS]

    want = greedy(model, fmt)
    assert len({tuple(a) for a in want}) > 1, "every answer the same: test would be vacuous"
    assert greedy(gguf_model, gguf_fmt) == want  # f16: identical tokens to the fp32 merged model
    assert want == greedy(run.model, fmt)  # and the merged folder is base + adapter, as served


def test_llama_gguf_metadata_carries_template_and_stops(llama_export, smollm2_tokenizer):
    out, _ = llama_export
    tok = smollm2_tokenizer
    meta = read_metadata(out / "model.gguf")
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.tokens"][tok.eos_token_id] == "<|im_end|>"
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    _, gguf_tok = load_gguf(out)
    assert gguf_tok.chat_template == tok.chat_template and gguf_tok.eos_token_id == tok.eos_token_id


def test_qwen3_gguf_round_trip_and_metadata(qwen_export, qwen_run):
    """transformers' GGUF config reader ignores qwen3's attention.key_length (it assumes head_dim
    128, as every released Qwen3 has; llama.cpp reads the key): the tiny model's config is passed."""
    from transformers import AutoConfig

    model = merged_model(qwen_export)
    loaded = load_for_inference(str(qwen_run))
    fmt, tok = loaded.format(), loaded.tokenizer
    gguf_model, gguf_tok = load_gguf(qwen_export, config=AutoConfig.from_pretrained(qwen_export))
    gguf_fmt = get_family("decoder").make_format(gguf_tok, loaded.config)
    assert [gguf_fmt.prompt_ids(q) for q in QUESTIONS] == [fmt.prompt_ids(q) for q in QUESTIONS]
    want = greedy(model, fmt)
    assert len({tuple(a) for a in want}) > 1, "every answer the same: test would be vacuous"
    assert greedy(gguf_model, gguf_fmt) == greedy(rounded(model, torch.float16), fmt)

    meta = read_metadata(qwen_export / "model.gguf")
    assert meta["general.architecture"] == "qwen3" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["qwen3.attention.key_length"] == 16
    assert meta["tokenizer.chat_template"] == tok.chat_template == gguf_tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == gguf_tok.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert meta["medassist.system_prompt"] == SYSTEM
    assert set(stop_ids(model, fmt)) <= {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
    types = tensor_types(qwen_export / "model.gguf")
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_q_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings: llama.cpp reads token_embd


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_bf16_is_exact_and_q8_0_agreement_is_reported(gguf_type, llama_export, tmp_path, record_property):
    from medassist.export.doctor import adds_bos, read_export

    out, _ = llama_export
    model = merged_model(out)
    _, fmt = read_export(out)
    folder = tmp_path / gguf_type
    folder.mkdir()
    prompt = GGUFPrompt(training_template(fmt), fmt.eos_id, fmt.pad_id, tuple(stop_ids(model, fmt)), adds_bos(fmt),
                        None)
    write_gguf(model, fmt.tokenizer, prompt, folder / "model.gguf", gguf_type)
    gguf_model, _ = load_gguf(folder)
    want = greedy(model, fmt)
    got = greedy(gguf_model, fmt)
    rate = agreement(gguf_model, model, fmt, want)
    identical = sum(a == b for a, b in zip(got, want))
    record_property(f"{gguf_type}_top1_agreement", rate)
    record_property(f"{gguf_type}_identical_answers", f"{identical}/{len(want)}")
    print(f"{gguf_type}: {identical}/{len(want)} greedy answers identical, top-1 agreement {rate:.3f}")
    if gguf_type == "bf16":  # exactly the merged weights at bf16
        assert got == greedy(rounded(model, torch.bfloat16), fmt)
    else:
        assert rate >= 0.8, f"q8_0 agrees with the merged model on only {rate:.1%} of answer tokens"


# ---------------------------------------------------------------------------------------
# doctor on exports
def test_a_run_without_system_prompt_is_served_and_exported_as_trained(llama_export, llama_run, capsys):
    """The llama run trained without a system prompt (SmolLM2's template wrote its own default
    system turn): serve sends none either, so the Modelfile has no SYSTEM (its TEMPLATE writes
    the template's default turn, as training saw it), export does not warn and doctor passes."""
    out, err = llama_export
    assert "serve-prompt" not in err
    assert Modelfile.read(out / "Modelfile").system is None
    assert main(["doctor", str(llama_run)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {llama_run}: ")


def test_doctor_passes_a_good_run_and_export(qwen_run, qwen_export, capsys):
    assert main(["doctor", str(qwen_run), "--export", str(qwen_export)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {qwen_run}: ")


def test_doctor_catches_exports_whose_stops_template_or_system_disagree(qwen_export, tmp_path):
    from medassist.export import check_export
    from medassist.export.doctor import adds_bos, read_export

    bad = tmp_path / "bad"
    shutil.copytree(qwen_export, bad)
    config = json.loads((bad / "generation_config.json").read_text())
    (bad / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": 151643}))
    modelfile = Modelfile.read(bad / "Modelfile")
    modelfile.stop, modelfile.system = ["<|endoftext|>"], "Something else."
    modelfile.template = modelfile.template.replace("<|im_start|>assistant", "<|im_start|>bot")
    modelfile.write(bad)
    _, fmt = read_export(bad)
    wrong = GGUFPrompt("{{ messages }}", 151643, fmt.pad_id, (151643,), adds_bos(fmt), "Another prompt.")
    write_gguf(merged_model(bad), fmt.tokenizer, wrong, bad / "model.gguf", "f16")

    problems = [f"{p.check}: {p.message}" for p in check_export(bad)]
    expected = [
        "generation-config: generation_config.json stops at ['<|endoftext|>' (151643)], the tokenizer ends answers "
        "with ['<|im_end|>' (151645)]",
        "gguf: model.gguf's chat template has …",
        "gguf: model.gguf's EOS is 151643, the tokenizer's EOS is '<|im_end|>' (151645)",
        "gguf: model.gguf stops at ['<|endoftext|>' (151643)], the tokenizer and generation_config.json at "
        "['<|im_end|>' (151645), '<|endoftext|>' (151643)]",
        "gguf: model.gguf's system prompt is 'Another prompt.', serve's 'Answer as a careful clinician would",
        "modelfile: Modelfile stops at ['<|endoftext|>'], the tokenizer and generation_config.json at ['<|im_end|>', "
        "'<|endoftext|>']",
        "modelfile: Modelfile TEMPLATE has …",
        "modelfile: Modelfile SYSTEM is 'Something else.', serve's system prompt 'Answer as a careful clinician",
    ]
    assert len(problems) == len(expected), problems
    for got, want in zip(problems, expected):
        assert got.startswith(want), (got, want)


# ---------------------------------------------------------------------------------------
# Ollama
def test_modelfile_has_template_system_stops_and_disclaimer(qwen_export):
    from medassist import DISCLAIMER
    from medassist.export.doctor import read_export

    mf = Modelfile.read(qwen_export / "Modelfile")
    assert mf.source == "./model.gguf"
    assert mf.template == go_template(ChatShape.of(read_export(qwen_export)[1]))
    assert mf.system == SYSTEM
    assert {"<|im_end|>", "<|im_start|>"} <= set(mf.stop)
    assert mf.parameters["temperature"] == "0" and mf.parameters["repeat_penalty"] == "1"
    comments = " ".join(mf.comments)
    assert " ".join(DISCLAIMER.split()) in comments and "ollama create medassist-qwen -f Modelfile" in comments
    card = (qwen_export / "README.md").read_text()
    assert "ollama create medassist-qwen -f Modelfile" in card and "medassist serve --model" in card


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go to run text/template (Ollama's template engine)")
@pytest.mark.parametrize("fixture", ["smollm2_tokenizer", "qwen_tokenizer"])
@pytest.mark.parametrize("prompt_format", ["auto", "plain"])
def test_go_template_renders_what_the_chat_template_renders(fixture, prompt_format, request, tmp_path):
    """Ollama's engine (Go's text/template) on the TEMPLATE gives the Jinja template's text, as
    Ollama calls it: a system message first when there is one, the last assistant turn open."""
    from medassist.config import TrainConfig

    tok = request.getfixturevalue(fixture)
    fmt = get_family("decoder").make_format(tok, TrainConfig(prompt_format=prompt_format))
    (tmp_path / "main.go").write_text(GO_RENDER)
    (tmp_path / "go.mod").write_text("module render\n\ngo 1.18\n")
    binary = tmp_path / "render"
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=tmp_path, check=True, capture_output=True)
    template = go_template(ChatShape.of(fmt))
    conversations = [[("user", 'Hi "there"\n')], [("system", "Be\tbrief."), ("user", "q1")],
                     [("user", "q1"), ("assistant", "a1"), ("user", "q2")],
                     [("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]]
    for conversation in conversations:
        messages = [{"role": r, "content": c} for r, c in conversation]
        request_json = json.dumps({"template": template, "messages": [{"Role": r, "Content": c} for r, c in conversation]})
        got = subprocess.run([str(binary)], input=request_json, capture_output=True, text=True, check=True).stdout
        if messages[-1]["role"] == "assistant":  # Ollama leaves the last assistant turn open to continue
            want = tok.apply_chat_template(messages, chat_template=training_template(fmt), tokenize=False)
            want = want[: len(want) - len(ChatShape.of(fmt).assistant_suffix)]
        else:
            want = tok.apply_chat_template(messages, chat_template=training_template(fmt), tokenize=False,
                                           add_generation_prompt=True)
        assert got == want, conversation


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		Messages []Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("Modelfile").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages, "System": "", "Prompt": ""}); err != nil {
		panic(err)
	}
}
"""


def test_chat_shapes_of_smollm2_qwen_and_plain(smollm2_tokenizer, qwen_tokenizer):
    from medassist.config import TrainConfig

    family = get_family("decoder")
    smol = ChatShape.of(family.make_format(smollm2_tokenizer, TrainConfig()))
    assert smol.no_system_prefix.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert smol.user_prefix == "<|im_start|>user\n" and smol.assistant_suffix == "<|im_end|>\n"
    assert ChatShape.of(family.make_format(qwen_tokenizer, TrainConfig())).no_system_prefix == ""

    plain = family.make_format(qwen_tokenizer, TrainConfig(prompt_format="plain", system_prompt="Be brief."))
    assert training_template(plain) == PLAIN_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert ChatShape.of(plain).render(messages) == plain.prompt_text("q2", [("q1", "a1")])


def test_a_template_that_is_not_fixed_text_around_messages_is_refused(qwen_tokenizer):
    import copy

    from medassist.config import TrainConfig

    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ loop.index }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="cannot be written as fixed text|where"):
        ChatShape.of(get_family("decoder").make_format(tok, TrainConfig()))


# ---------------------------------------------------------------------------------------
# bad inputs: one line each
def test_encoder_decoder_gguf_is_refused_in_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "t5", "tiny-t5")
    assert main(["export", str(run), "--out", str(tmp_path / "out"), "--gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --gguf: {get_family('encoder-decoder').gguf_refusal}"]
    assert not (tmp_path / "out").exists()


def test_non_run_directory_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x"), "--gguf"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: not a finished medassist run "
                                                "(needs config.yaml and final/)")
    assert main(["doctor", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path}: not a medassist export (no medassist_export.json) and not a finished run")


def test_unsupported_architecture_and_tokenizer_are_one_line(qwen_tokenizer, bert_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=len(qwen_tokenizer)))
    prompt = GGUFPrompt("", 0, 0, (0,), False, None)
    with pytest.raises(GGUFError, match=r"^architecture GPT2LMHeadModel: medassist writes GGUF for "
                                        r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM; export without --gguf"):
        write_gguf(gpt2, qwen_tokenizer, prompt, "/nonexistent/model.gguf")
    from medassist.export.gguf import pre_tokenizer

    with pytest.raises(GGUFError, match="pre-tokenizer .* is not one medassist knows"):
        pre_tokenizer(bert_tokenizer)


def test_full_disk_is_one_line_and_leaves_nothing(qwen_run, tmp_path, monkeypatch, capsys):
    import gguf

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = tmp_path / "out"
    assert main(["export", str(qwen_run), "--out", str(out), "--gguf", "--gguf-type", "q8_0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --out {out}: no space left on device while writing the export (nothing was written; "
                       "free some space or choose another --out)")
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary folder


# ---------------------------------------------------------------------------------------
# the real model
@pytest.mark.integration
def test_smollm2_round_trip(tmp_path):
    """SmolLM2-135M with a small random adapter: f16 GGUF answers token for token as the merged
    model; the template (with SmolLM2's own default system turn) and stops carried."""
    run = make_run(tmp_path / "run", "smollm2-135m", lora_alpha=1, system_prompt=SYSTEM)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--gguf"]) == 0
    assert main(["doctor", str(run), "--export", str(out)]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded = load_for_inference(str(run))
    fmt = loaded.format()
    gguf_model, gguf_tok = load_gguf(out)
    meta = read_metadata(out / "model.gguf")
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.chat_template"] == loaded.tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == loaded.tokenizer.eos_token_id == 2
    gguf_fmt = get_family("decoder").make_format(gguf_tok, loaded.config)
    want = greedy(model, fmt, max_new_tokens=24)
    assert greedy(gguf_model, gguf_fmt, max_new_tokens=24) == want
    assert "diabetes" in loaded.tokenizer.decode(want[0]).lower()  # a real answer, not noise
    assert "SYSTEM" in (out / "Modelfile").read_text() and SYSTEM in (out / "Modelfile").read_text()
