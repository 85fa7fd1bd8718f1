"""Sibling projections in one matmul while a LoRA decoder trains (``fused_projections``, issue 14).

q, k and v read the same normed hidden state, and so do an MLP's gate and up. PEFT runs each
as its own base matmul plus its own rank-r adapter (``lora_A`` then ``lora_B``): five base
matmuls and five thin ``lora_A`` matmuls per layer, each reading the same input. Here, with the
frozen base weights in bf16 (:class:`~medassist.training.speed.FrozenWeights`), each group's
base weights are stored as one matrix (the members' weights are views of it, so no memory is
added) and each group's ``lora_A`` weights are concatenated at every step (they train): one
base matmul and one ``lora_A`` matmul per group; each member's ``lora_B`` stays its own. The
PEFT modules, parameters and adapters do not change, only the order of the work.

The first member the model calls computes the whole group and keeps the others' outputs for
their calls; a member called with another input runs on its own; anything else (another input, an
adapter switched off, merged or swapped, dropout, a LoRA variant such as DoRA, fp32 weights
back for generation) runs PEFT's own forward. PEFT and torch do not offer this: PEFT has no
fused-QKV LoRA path and inductor does not merge matmuls that share an input.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Group:
    """One set of sibling LoRA linears; ``weight`` is their base weights as one matrix, or None
    while they are separate (fp32 weights back, or never shared)."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.layers = layers
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}

    def share(self) -> None:
        """Store the members' (frozen) base weights as one matrix, each member's a view of it."""
        bases = [layer.base_layer for layer in self.layers]
        with torch.no_grad():
            self.weight = torch.cat([b.weight for b in bases])
            self.bias = torch.cat([b.bias for b in bases]) if bases[0].bias is not None else None
        start = 0
        for base in bases:
            rows = base.weight.shape[0]
            base.weight = torch.nn.Parameter(self.weight[start:start + rows], requires_grad=False)
            if self.bias is not None:
                base.bias = torch.nn.Parameter(self.bias[start:start + rows], requires_grad=False)
            start += rows

    def release(self) -> None:
        self.weight = self.bias = self.input = None
        self.outputs = {}

    def usable(self) -> bool:
        if self.weight is None:
            return False
        for layer in self.layers:
            adapters = layer.active_adapters
            if (layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] not in layer.lora_A
                    or adapters[0] in layer.lora_variant
                    or not isinstance(layer.lora_dropout[adapters[0]], torch.nn.Identity)
                    or layer.base_layer.weight.dtype != self.weight.dtype):
                return False
        return True

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for input ``x``: base + lora_B(lora_A(x)) * scaling, as PEFT."""
        adapters = [layer.active_adapters[0] for layer in self.layers]
        base = F.linear(x, self.weight, self.bias).split([l.base_layer.out_features for l in self.layers], dim=-1)
        a = torch.cat([layer.lora_A[name].weight for layer, name in zip(self.layers, adapters)])
        low = F.linear(x, a).split([layer.lora_A[name].out_features for layer, name in zip(self.layers, adapters)],
                                   dim=-1)
        return [y + layer.lora_B[name](z) * layer.scaling[name]
                for y, z, layer, name in zip(base, low, self.layers, adapters)]


def _member_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A member's forward: its output from the group's one pass, else PEFT's forward."""
    group, index = self._medassist_group, self._medassist_index
    if args or kwargs or not group.usable():
        return type(self).forward(self, x, *args, **kwargs)
    if index in group.outputs:
        if group.input is not x:  # another input mid-round (as cross-attention would): this one alone
            return type(self).forward(self, x)
        out = group.outputs.pop(index)
        if not group.outputs:
            group.input = None
        return out
    outputs = group.forward(x)  # a new round
    group.input, group.outputs = x, {i: out for i, out in enumerate(outputs) if i != index}
    return outputs[index]


class FusedProjections:
    """The sibling groups of a PEFT LoRA decoder, their members' forwards replaced while it
    trains; :meth:`share` (bf16 weights in place) and :meth:`release` (fp32 weights coming
    back) follow :class:`~medassist.training.speed.FrozenWeights`, :meth:`remove` for good."""

    def __init__(self, model):
        self.groups = find_groups(model)
        for group in self.groups:
            for index, layer in enumerate(group.layers):
                layer._medassist_group, layer._medassist_index = group, index
                layer.forward = types.MethodType(_member_forward, layer)

    def share(self) -> None:
        for group in self.groups:
            group.share()

    def release(self) -> None:
        for group in self.groups:
            group.release()

    def remove(self) -> None:
        self.release()
        for group in self.groups:
            for layer in group.layers:
                for attr in ("forward", "_medassist_group", "_medassist_index"):
                    layer.__dict__.pop(attr, None)


def find_groups(model) -> list[Group]:
    """Sibling LoRA linears (q/k/v, gate/up) under one parent, all with the same input size."""
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            layers = [getattr(parent, name, None) for name in names]
            if not all(hasattr(layer, "lora_A") and hasattr(layer, "base_layer") for layer in layers):
                continue
            bases = [layer.base_layer for layer in layers]
            if (all(isinstance(b, torch.nn.Linear) for b in bases) and len({b.in_features for b in bases}) == 1
                    and len({b.bias is None for b in bases}) == 1):
                groups.append(Group(layers))
    return groups
