"""Speed and memory switches of a training run (issue 14), each behind a ``TrainConfig`` field.

- ``bf16_frozen_weights``: :class:`FrozenWeights`, the frozen base linears of a LoRA model
  stored in bf16 while training under bf16 autocast (and each linear input cast once,
  :class:`CastOnce`), the exact fp32 weights put back wherever something runs outside autocast.
- ``head_chunk_size``: the answer-only head in chunks
  (:func:`medassist.families.chunked_head_nll`, used by
  :class:`~medassist.training.trainer.MedassistTrainer`).
- ``recompute_mlp_activation``: :func:`recompute_swiglu`, SiLU(gate) recomputed in backward.
- ``gradient_checkpointing``: transformers' per-layer activation checkpointing
  (:func:`~medassist.training.recipe.build_model`): the most memory saved, one more forward
  per step.
- ``torch_compile``: :class:`CompiledLayers`, each repeated block compiled by inductor for the
  training steps (evaluation and generation stay eager).

Each gives the loss and the gradients of the reference path, bit for bit where it says so
(``tests/test_efficiency.py``, ``tests/test_precision.py``); ``bench/train_throughput.py
--variants`` measures each.
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from medassist.families import _unwrap


class FrozenWeights:
    """The frozen base linears of a LoRA model, stored in bf16 while it trains under bf16 autocast.

    Under autocast every linear casts its weight to bf16 at every forward (autocast caches the
    casts only of weights that require grad, so a frozen base is re-cast every step) and keeps
    the copy for backward. Stored in bf16, the weights are used as they are: a matmul sees the
    same bf16 values (autocast's cast rounds to nearest, as ``Tensor.to`` does), so the loss
    and the gradients do not change, the casts go, and the fp32 copies (half the frozen
    weights' memory) are dropped. Embeddings, norms and the LM head (tied to the embeddings in
    SmolLM2 and Qwen3) stay fp32, so the residual stream keeps its fp32 precision.

    PEFT casts each LoRA layer's input to the adapter's dtype (fp32) before ``lora_A``, which
    autocast casts straight back to bf16; that round trip is switched off while the weights
    are bf16 (same values), and every linear input is cast once (:class:`CastOnce`). The
    weights that stay fp32 are copied out of the checkpoint's memory map, so the fp32 pages of
    the linears leave the resident set.

    What runs outside autocast needs fp32 weights: :meth:`fp32` puts the exact fp32 weights back
    for a while (generation metrics during training), :meth:`restore` for good (after training,
    so the evaluation scores what ``final/`` serves on its fp32 base). They come from
    ``load_base`` (the base model as :func:`~medassist.models.load_pretrained` loads it, which is
    what ``load_for_inference`` puts under the adapter), checked against the bf16 copies.
    """

    def __init__(self, model, load_base: Callable[[], Any], dtype: torch.dtype = torch.bfloat16,
                 cast_once: bool = True):
        self.model = model
        self.load_base = load_base
        self.dtype = dtype
        self.cast_once = cast_once  # False under torch.compile: inductor merges the repeated casts itself
        self._hooks: list[Any] = []
        self.names = frozen_linear_names(model)
        self.cast()
        _off_the_file(model, self.names)

    def cast(self) -> None:
        """Frozen linears to ``dtype`` (rounded to nearest, as autocast would); each linear's
        fp32 input cast once (:class:`CastOnce`)."""
        lm = _unwrap(self.model)
        for name in self.names:
            lm.get_submodule(name).to(self.dtype)
        _peft_input_casts(self.model, enabled=False)
        if self.cast_once and not self._hooks:
            once = CastOnce(self.dtype)
            linears = [lm.get_submodule(n) for n in self.names] + _lora_a(self.model)
            self._hooks = [m.register_forward_pre_hook(once) for m in linears]

    def restore(self) -> None:
        """The exact fp32 weights of the base model back in place of the bf16 copies."""
        lm = _unwrap(self.model)
        base = _unwrap(self.load_base())
        for name in self.names:
            module, original = lm.get_submodule(name), base.get_submodule(_base_name(name))
            for key, value in original.named_parameters(recurse=False):
                current = getattr(module, key)
                if current.shape != value.shape or not torch.equal(value.detach().to(current.dtype), current.detach()):
                    raise RuntimeError(f"bf16_frozen_weights: the reloaded base weight {name}.{key} is not the one "
                                       "trained on; cannot restore the fp32 weights exactly")
                setattr(module, key, torch.nn.Parameter(value.detach().to(current.device), requires_grad=False))
        _peft_input_casts(self.model, enabled=True)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @contextmanager
    def fp32(self) -> Iterator[None]:
        """The exact fp32 weights inside the block, bf16 again after it."""
        self.restore()
        try:
            yield
        finally:
            self.cast()

    def around(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``fn(model)`` run with the fp32 weights (generation metrics compute outside autocast)."""
        def run(model):
            with self.fp32():
                return fn(model)

        return run


class CastOnce:
    """A forward pre-hook for linears under autocast: an fp32 input becomes its bf16 copy,
    made once per input tensor and shared by every linear that reads it.

    Autocast casts a linear's input at every call: q, k and v (and gate and up) each cast the
    same normed hidden state, for the base layer and for the adapter, and each adapter keeps
    its copy for backward. Here the copy is made once; each linear gets its own autograd node
    (:class:`_SharedCast`) over the shared storage, so each gradient goes back to fp32 on its
    own and they add up in fp32 as before: the same values forward and backward, fewer casts,
    one saved copy instead of one per adapter.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}

    def __call__(self, module, args):
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type)
                and torch.get_autocast_dtype(x.device.type) == self.dtype):
            return None
        key = id(x)
        hit = self.copies.get(key)
        if hit is None or hit[0]() is not x or hit[1] != x._version:
            def forget(ref, key=key):
                if self.copies.get(key, (None,))[0] is ref:
                    del self.copies[key]

            hit = (weakref.ref(x, forget), x._version, x.detach().to(self.dtype))
            self.copies[key] = hit
        return (_SharedCast.apply(x, hit[2]), *args[1:])


class _SharedCast(torch.autograd.Function):
    """``x.to(copy.dtype)`` where ``copy`` is that cast, already made: a view of it forward,
    the gradient back in ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, copy):
        ctx.dtype = x.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def frozen_linear_names(model) -> list[str]:
    """``nn.Linear`` modules of the (unwrapped) model with no trainable parameter and no
    parameter shared with another module (a tied LM head), by name."""
    lm = _unwrap(model)
    uses = Counter(id(p) for _, p in lm.named_parameters(remove_duplicate=False))
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    names = []
    for name, module in lm.named_modules():
        params = list(module.parameters(recurse=False))
        if (isinstance(module, torch.nn.Linear) and module is not head and params
                and not any(p.requires_grad or uses[id(p)] > 1 for p in params)):
            names.append(name)
    return names


def bf16_frozen_weights(cfg, trainer, precision: str, lora: bool, load_base: Callable[[], Any],
                        log: Callable[[str], None] = lambda _m: None,
                        compiled: bool = False) -> FrozenWeights | None:
    """With ``cfg.bf16_frozen_weights``, LoRA and bf16 precision (not under FSDP, whose flat
    parameters take one dtype): the trainer's model with bf16 frozen linears, and its
    generation metrics run on the fp32 weights. None where the switch does not apply."""
    if not cfg.bf16_frozen_weights:
        return None
    if precision != "bf16" or not lora or trainer.is_fsdp_enabled:
        why = "precision is not bf16" if precision != "bf16" else "no LoRA" if not lora else "FSDP"
        log(f"bf16_frozen_weights ignored: {why}")
        return None
    # CastOnce's hooks (a dict of weak references) would break a compiled graph at every linear
    frozen = FrozenWeights(trainer.model, load_base, cast_once=not compiled)
    if trainer.generation_eval is not None:
        trainer.generation_eval = frozen.around(trainer.generation_eval)
    return frozen


class CompiledLayers:
    """``torch.compile`` (inductor) of each repeated block of the model (decoder layers, T5 and
    BERT blocks) for the training steps; evaluation and generation run eager
    (:meth:`eager`), and :meth:`remove` puts the eager blocks back for good after training.

    Per block, as torchtune compiles, rather than the whole model: every block runs the same
    code, so one graph serves them all (one compilation, not one per layer), and what runs
    around the blocks (masks, the answer-only head, PEFT's bookkeeping) stays Python. Shapes
    are dynamic from the first compilation, since dynamic padding gives every batch its own
    length. The loss and gradients agree with eager to bf16/fp32 rounding, not bit for bit
    (inductor fuses and reorders the elementwise work).
    """

    def __init__(self, model, dynamic: bool = True):
        self.blocks = repeated_blocks(_unwrap(model))
        for block in self.blocks:
            block.compile(dynamic=dynamic)

    def remove(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None  # the slot nn.Module.compile fills: the eager forward again

    @staticmethod
    def eager():
        """A context in which compiled code runs eager (its own shapes, no new compilation)."""
        return torch.compiler.set_stance("force_eager")


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The modules of every outermost ``ModuleList`` whose items are two or more of one class
    (the layers of a decoder, the blocks of a T5 encoder and decoder)."""
    blocks: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) == 1:
            blocks.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return blocks


def compile_layers(cfg, trainer, log: Callable[[str], None] = lambda _m: None) -> CompiledLayers | None:
    """With ``cfg.torch_compile``: the trainer's model with compiled blocks, its evaluation
    (validation loss and generation metrics) eager. None where the switch is off, or where
    inductor cannot build kernels (no C++ compiler for a CPU run), said in one line."""
    if not cfg.torch_compile:
        return None
    if trainer.args.device.type == "cpu" and not cpp_compiler():
        log("torch_compile ignored: inductor needs a C++ compiler on CPU (g++ or clang++ on PATH, or $CXX)")
        return None
    compiled = CompiledLayers(trainer.model)
    trainer.eval_context = compiled.eager
    log(f"torch_compile: {len(compiled.blocks)} blocks compiled with inductor (the first step compiles them)")
    return compiled


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on CPU, or None."""
    import os
    import shutil

    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    return next(filter(None, map(shutil.which, names)), None)


def _off_the_file(model, cast: list[str]) -> None:
    """Copy the parameters and buffers that stay fp32 out of the checkpoint's memory map.

    transformers maps a safetensors file into memory and its weights are views of it; pages
    once read stay resident (and count in RSS) while any view is alive. Once the linears are
    bf16 copies, the embeddings and norms are the last views: copied, the map goes, and with
    it the fp32 pages of the linears."""
    lm = _unwrap(model)
    skip = {id(p) for name in cast for p in lm.get_submodule(name).parameters()}
    with torch.no_grad():
        for tensor in [*lm.parameters(), *lm.buffers()]:
            if id(tensor) not in skip and not tensor.requires_grad and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def release_freed_memory() -> None:
    """Give the pages that training freed back to the OS before evaluation starts (glibc keeps
    freed heap memory in its arenas, so the process would carry training's peak into the
    report); a no-op where the C library has no ``malloc_trim``. No ``gc.collect()`` first: in
    the default recipe a full collection took 0.45-0.53 s a call and, after the first step,
    found no reference cycle holding a tensor (RSS after it equal to within 2 MiB; bench/RESULTS.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once (the release runs after every step and answer),
    or None where the C library has none."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trimming(progress=None):
    """A progress factory (``(label, total) -> update(n)``, as the evaluation takes) whose every
    update first calls :func:`release_freed_memory` (the evaluation reports each finished answer or
    batch). ``progress`` None: trimming only."""
    def factory(label: str, total: int):
        update = progress(label, total) if progress is not None else None

        def step(n: int) -> None:
            release_freed_memory()
            if update is not None:
                update(n)
        return step
    return factory


def recompute_swiglu(model) -> int:
    """Decoder MLPs of the form ``down(silu(gate(x)) * up(x))`` (Llama, Qwen2/3, Mistral) keep
    ``gate(x)`` and ``up(x)`` for backward and recompute ``silu(gate(x))`` there, instead of
    keeping it as well: a quarter less of the MLP's saved activations (the largest ones, at the
    intermediate width), for one SiLU per layer in backward. Same kernels in the same order, so
    the same loss and gradients bit for bit. Returns the number of MLPs changed."""
    import types

    changed = 0
    for module in model.modules():
        linears = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if (type(module).__name__.endswith("MLP") and all(m is not None for m in linears)
                and isinstance(getattr(module, "act_fn", None), _silu_modules())
                and getattr(getattr(module, "config", None), "pretraining_tp", 1) == 1):
            module.forward = types.MethodType(_swiglu_forward, module)
            changed += 1
    return changed


def _silu_modules() -> tuple[type, ...]:
    from transformers.activations import SiLUActivation

    return torch.nn.SiLU, SiLUActivation


def _swiglu_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _base_name(name: str) -> str:
    """The module's name in the plain base model (PEFT wraps each adapted linear as ``base_layer``)."""
    return name.replace(".base_layer", "")


def _lora_a(model) -> list[torch.nn.Module]:
    """Every LoRA layer's ``lora_A`` linears (the adapters' input side)."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled")]
    return [linear for layer in layers for linear in layer.lora_A.values()]


def _peft_input_casts(model, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
            module.cast_input_dtype_enabled = enabled
