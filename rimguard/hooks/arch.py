"""Locate every decoder layer's MLP and its intermediate activation.

One rule covers the supported families (Llama, Qwen2/3, Mistral, Gemma 1-3, Phi3, OLMo2, GPT-2)
and their PEFT-LoRA wrappers:

1. The decoder stack is the ``nn.ModuleList`` whose items most often have an MLP child
   (a child named ``mlp``, ``feed_forward`` or ``ffn``).
2. Inside an MLP, the projections are its direct children with a 2-D weight (``nn.Linear``,
   GPT-2's ``Conv1D``, or a PEFT layer around either). The hidden size is the input width
   shared by the input-side projections; the *down projection* is the one that maps a
   different width back to the hidden size. Its input is the intermediate activation
   ``act(gate) * up`` (gated) or ``act(fc)`` (GPT-2): that is what rimguard calls a neuron.
3. Every other projection is *input-side*: its output has ``k * I`` features (``k = 2`` for
   Phi3's fused ``gate_up_proj``), and neuron ``j`` owns output features ``j + c * I``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

MLP_NAMES = ("mlp", "feed_forward", "ffn")


class UnsupportedModelError(ValueError):
    """Raised when the MLP layout of a model cannot be found."""


@dataclass(frozen=True)
class Projection:
    """A linear map inside an MLP.

    Attributes:
        name: dotted module name, relative to the model.
        module: the module as it sits in the model (may be a PEFT LoRA layer).
        in_features: input width.
        out_features: output width.
        transposed: True for GPT-2 ``Conv1D``, whose weight is ``[in, out]``.
    """

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    transposed: bool

    @property
    def base(self) -> nn.Module:
        """The underlying dense layer (PEFT's ``base_layer`` when wrapped)."""
        return _base_layer(self.module)


@dataclass(frozen=True)
class MLPLayer:
    """One decoder layer's MLP.

    Attributes:
        index: decoder layer index, 0-based.
        block: the decoder block that holds this MLP.
        down: the projection whose input is the intermediate activation ``[B, T, I]``.
        inputs: the input-side projections (gate/up, fc, or fused gate_up).
        size: intermediate size ``I`` (number of neurons in this layer).
    """

    index: int
    block: nn.Module
    down: Projection
    inputs: tuple[Projection, ...]
    size: int


def _base_layer(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def _as_projection(name: str, module: nn.Module) -> Projection | None:
    base = _base_layer(module)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(base, nn.Linear):
        return Projection(name, module, base.in_features, base.out_features, transposed=False)
    if type(base).__name__ == "Conv1D":  # GPT-2 style: y = x @ W + b with W [in, out]
        return Projection(name, module, weight.shape[0], weight.shape[1], transposed=True)
    return None


def _find_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        hits = sum(any(hasattr(block, n) for n in MLP_NAMES) for block in module)
        if hits and (best is None or hits > best[0]):
            best = (hits, name, module)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no decoder stack, i.e. no nn.ModuleList whose blocks "
            f"have an MLP child named one of {MLP_NAMES}."
        )
    return best[1], best[2]


def _split_mlp(model_name: str, prefix: str, mlp: nn.Module) -> tuple[Projection, tuple[Projection, ...]]:
    projections = [
        p for n, m in mlp.named_children() if (p := _as_projection(f"{prefix}.{n}", m)) is not None
    ]
    if len(projections) < 2:
        raise UnsupportedModelError(
            f"{model_name}: MLP '{prefix}' ({type(mlp).__name__}) has {len(projections)} linear "
            "children; expected an input-side projection and a down projection (mixture-of-experts "
            "MLPs are not supported)."
        )
    hidden = Counter(p.in_features for p in projections).most_common(1)[0][0]
    downs = [p for p in projections if p.out_features == hidden and p.in_features != hidden]
    if len(downs) != 1:
        raise UnsupportedModelError(
            f"{model_name}: MLP '{prefix}' has no unique down projection (a linear map from the "
            f"intermediate width back to the hidden width {hidden}); found "
            f"{[(p.name, p.in_features, p.out_features) for p in projections]}."
        )
    down = downs[0]
    inputs = tuple(p for p in projections if p is not down)
    for p in inputs:
        if p.in_features != hidden or p.out_features % down.in_features:
            raise UnsupportedModelError(
                f"{model_name}: projection '{p.name}' ({p.in_features}->{p.out_features}) does not "
                f"map the hidden width {hidden} to a multiple of the intermediate size {down.in_features}."
            )
    return down, inputs


def find_mlp_layers(model: nn.Module) -> list[MLPLayer]:
    """Return the MLP of every decoder layer, in depth order.

    Args:
        model: a ``transformers`` causal LM, bare or wrapped by PEFT.

    Raises:
        UnsupportedModelError: naming the model class and what was looked for.
    """
    model_name = type(model).__name__
    stack_name, stack = _find_stack(model)
    layers = []
    for i, block in enumerate(stack):
        mlp_attr = next((n for n in MLP_NAMES if hasattr(block, n)), None)
        if mlp_attr is None:
            raise UnsupportedModelError(f"{model_name}: block {stack_name}.{i} has no MLP child {MLP_NAMES}.")
        down, inputs = _split_mlp(model_name, f"{stack_name}.{i}.{mlp_attr}", getattr(block, mlp_attr))
        layers.append(MLPLayer(index=i, block=block, down=down, inputs=inputs, size=down.in_features))
    return layers
