"""``model.gguf``: a merged decoder-only model as llama.cpp and Ollama load it.

The writing is done by ``gguf`` (gguf-py, published by the llama.cpp project from its own
repository): :class:`gguf.GGUFWriter` for the file, :class:`gguf.TensorNameMap` for tensor
names, :mod:`gguf.quants` for f16/bf16/q8_0, :class:`gguf.SpecialVocab` for the merges and the
special-token ids. What remains here follows llama.cpp's ``convert_hf_to_gguf.py`` for the
architectures medassist trains (its ``LlamaModel``, ``Qwen2Model``, ``Qwen3Model``): the
hyperparameter keys, the Q/K row permutation Llama needs, which tensors stay f32, the
vocabulary's token types, and the pre-tokenizer name found by hashing the tokens of a fixed
text (``get_vocab_base_pre``; the hashes below are copied from it).

medassist then writes what a converter cannot know, so llama.cpp prompts the model exactly as
training did: the chat template it was trained with, the EOS the answers were trained to end
on (plus every other token ``medassist serve`` stops at, as EOT/EOM), whether a BOS is added,
and the system prompt (``medassist.system_prompt``; llama.cpp ignores keys it does not know).
"""

from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from medassist.errors import MedassistError

GGUF_TYPES = ("f16", "bf16", "q8_0")
SYSTEM_PROMPT_KEY = "medassist.system_prompt"
VERSION_KEY = "medassist.version"

# convert_hf_to_gguf.py get_vocab_base_pre(): sha256 of str(tokenizer.encode(CHKTXT)) -> tokenizer.ggml.pre
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


class GGUFError(MedassistError):
    """A model that cannot be written as GGUF; the message says why and what to use instead."""


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # Llama's HF checkpoints order Q/K rows for rotate_half; llama.cpp wants them interleaved
    write_vocab_size: bool  # LlamaModel.set_gguf_parameters writes vocab_size and rope dimension count


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("LLAMA", permute_qk=True, write_vocab_size=True),
    "Qwen2ForCausalLM": Architecture("QWEN2", permute_qk=False, write_vocab_size=False),
    "Qwen3ForCausalLM": Architecture("QWEN3", permute_qk=False, write_vocab_size=False),
}


@dataclass(frozen=True)
class GGUFPrompt:
    """How the model was prompted in training: what the GGUF must tell llama.cpp."""

    chat_template: str
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]  # every token generation stops at, eos_id first
    add_bos: bool  # prompts start with a BOS the tokenizer adds (not one the template writes)
    system_prompt: str | None


def architecture_of(model) -> tuple[str, Architecture]:
    names = list(getattr(model.config, "architectures", None) or []) + [type(model).__name__]
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    raise GGUFError(f"architecture {names[0]}: medassist writes GGUF for {', '.join(ARCHITECTURES)}; export "
                    "without --gguf and convert the folder with llama.cpp's convert_hf_to_gguf.py")


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (``tokenizer.ggml.pre``)."""
    digest = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise GGUFError(f"tokenizer {type(tokenizer).__name__}: its pre-tokenizer (hash {digest[:12]}) is not one "
                        f"medassist knows ({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); export without --gguf "
                        "and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[digest]


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for every id below ``vocab_size`` (convert_hf_to_gguf.py
    ``get_vocab_base``: added special tokens are CONTROL, other added ones USER_DEFINED, ids with
    no token ``[PADn]`` UNUSED)."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(vocab.values())}, the model's embedding only {vocab_size} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py LlamaModel.permute
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise GGUFError(f"RoPE scaling {params['rope_type']!r}: medassist writes GGUF only for unscaled RoPE; convert "
                        "the exported folder with llama.cpp's convert_hf_to_gguf.py")
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def write_gguf(model, tokenizer, prompt: GGUFPrompt, path: str | Path, gguf_type: str = "f16", name: str = "",
               progress: Callable[[str], None] = lambda _m: None) -> Path:
    """Write ``model`` (a merged transformers causal LM) and ``tokenizer`` to ``path``."""
    import gguf

    from medassist import __version__

    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    hf_arch, arch = architecture_of(model)
    config = model.config
    model_arch = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[model_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or hf_arch)
    # hyperparameters: convert_hf_to_gguf.py TextModel.set_gguf_parameters (+ LlamaModel's)
    writer.add_block_count(n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    if (theta := _rope_theta(config)) is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.write_vocab_size:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim or config.hidden_size // n_head)
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # the tokenizer: convert_hf_to_gguf.py _set_vocab_gpt2, then what training did
    tokens, types = vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size)
    special.special_token_ids.update(eos=prompt.eos_id, pad=prompt.pad_id)
    for kind, token_id in zip(("eot", "eom"), [i for i in prompt.stop_ids if i != prompt.eos_id]):
        special.special_token_ids[kind] = token_id
    if len(set(prompt.stop_ids)) > 3:
        raise GGUFError(f"the model stops at {len(set(prompt.stop_ids))} tokens; GGUF names at most 3 (eos, eot, eom)")
    special.add_special_token.update(bos=prompt.add_bos, eos=False)  # the answer's EOS is generated, never added
    special.chat_template = prompt.chat_template
    special.add_to_gguf(writer, quiet=True)
    if prompt.system_prompt:
        writer.add_string(SYSTEM_PROMPT_KEY, prompt.system_prompt)
    writer.add_string(VERSION_KEY, __version__)

    # the tensors: convert_hf_to_gguf.py ModelBase.prepare_tensors
    names = gguf.get_tensor_name_map(model_arch, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    progress(f"converting {sum(1 for _ in model.state_dict())} tensors to {gguf_type}")
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith(".rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the output layer reads token_embd when tied
        data = tensor.detach().to(torch.float32)
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise GGUFError(f"tensor {hf_name} of {hf_arch} has no GGUF name; convert the exported folder with "
                            "llama.cpp's convert_hf_to_gguf.py")
        array = data.numpy()
        # norms and other 1-D tensors stay f32, as llama.cpp expects
        kind = gguf.GGMLQuantizationType.F32 if array.ndim <= 1 or new_name.endswith("_norm.weight") else qtype
        try:
            packed = gguf.quants.quantize(array, kind)
        except gguf.QuantError:  # rows not a multiple of the block size: f16, as convert_hf_to_gguf.py does
            kind = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(array, kind)
        writer.add_tensor(new_name, packed, raw_dtype=kind)

    path = Path(path)
    progress(f"writing {path.name}")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------------------
# reading back
def read_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF's key/value metadata as Python values, the token list included (the other large
    arrays as counts). transformers' reader: the GGUF loader that the round trip tests."""
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    return metadata


@contextmanager
def alone(path: str | Path) -> Iterator[Path]:
    """A temporary folder holding only a link to the GGUF at ``path``: transformers' ``gguf_file=``
    loaders read a ``tokenizer.json`` or ``config.json`` beside the file instead of the GGUF's own."""
    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="gguf-") as folder:
        (Path(folder) / path.name).symlink_to(path)
        yield Path(folder)


def tensor_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> ggml type name (``F16``, ``Q8_0`` ...)."""
    from gguf import GGMLQuantizationType
    from transformers.integrations.gguf import GgufHeader

    return {name: GGMLQuantizationType(kind).name for name, kind in GgufHeader.from_file(str(path)).ggml_types.items()}
