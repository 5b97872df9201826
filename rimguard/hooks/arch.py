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

Mixture-of-experts layers (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 and other
transformers 5 families) hold an ``experts`` child whose weights are stacked over experts:
``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` (transposed, interleaved or with bias as
its flags say), called as ``experts(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])``.
A neuron is one unit of one expert: unit ``j`` of expert ``e`` has id ``e * I + j`` in its layer.
A shared expert (``shared_expert`` / ``shared_experts``, a dense MLP) follows: its unit ``j`` has
id ``E * I + j``. So a layer's size is ``E * I`` plus the shared expert's width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from rimguard import dist

MLP_NAMES = ("mlp", "feed_forward", "ffn")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")


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
class ExpertBank:
    """The routed experts of one MoE layer, weights stacked over experts.

    The weights are read through ``module`` at every use (``module.gate_up_proj``), so a PEFT
    parametrization of them (LoRA ``target_parameters``) is seen as the model sees it.

    Attributes:
        name: dotted module name of the experts module, relative to the model.
        module: the experts module (the innermost one if PEFT wraps it).
        num_experts: ``E``.
        size: intermediate size ``I`` of one expert.
        transposed: weights stored ``[E, H, 2I]`` / ``[E, I, H]`` instead of ``[E, 2I, H]`` / ``[E, H, I]``.
        concatenated: ``gate_up_proj`` holds all gate rows, then all up rows (else interleaved, gate ``2j``, up ``2j + 1``).
        adapted: a PEFT layer wraps the experts (LoRA on their weights through ``target_parameters``).
    """

    name: str
    module: nn.Module
    num_experts: int
    size: int
    transposed: bool
    concatenated: bool
    adapted: bool = False

    @property
    def units(self) -> int:
        """``E * I``: the layer ids this bank's units take."""
        return self.num_experts * self.size

    def gate_up_rows(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The weights that make ``units`` (``[n]`` ids ``e * I + j``): gate and up rows ``[n, H]`` each,
        and their biases ``[n]`` (None without bias). Differentiable."""
        expert, j = units // self.size, units % self.size
        gate_row, up_row = (j, j + self.size) if self.concatenated else (2 * j, 2 * j + 1)
        weight = self.module.gate_up_proj
        if self.transposed:  # [E, H, 2I]
            gate, up = weight[expert, :, gate_row], weight[expert, :, up_row]
        else:  # [E, 2I, H]
            gate, up = weight[expert, gate_row], weight[expert, up_row]
        bias = getattr(self.module, "gate_up_proj_bias", None) if getattr(self.module, "has_bias", False) else None
        if bias is None:
            return gate, up, None, None
        return gate, up, bias[expert, gate_row], bias[expert, up_row]

    def activation(self, pre_gate: torch.Tensor, pre_up: torch.Tensor) -> torch.Tensor:
        """The expert's intermediate activation from its gate and up pre-activations (``act(gate) * up``)."""
        return self.module.act_fn(pre_gate) * pre_up

    def slices(self, units: torch.Tensor) -> list[tuple[str, tuple]]:
        """What ``units`` own, as ``(parameter name, indexer)``: ``param[indexer]`` is the part of the
        parameter that only those units use (gate and up rows of ``gate_up_proj`` and its bias, the
        columns of ``down_proj``), for each unit's own expert."""
        expert, j = units // self.size, units % self.size
        rows = torch.cat([j, j + self.size]) if self.concatenated else torch.cat([2 * j, 2 * j + 1])
        twice = expert.repeat(2)
        every = slice(None)
        out = [("gate_up_proj", (twice, every, rows) if self.transposed else (twice, rows)),
               ("down_proj", (expert, j) if self.transposed else (expert, every, j))]
        if getattr(self.module, "has_bias", False):
            out.append(("gate_up_proj_bias", (twice, rows)))
        return out


@dataclass(frozen=True)
class MLPLayer:
    """One decoder layer's MLP.

    Attributes:
        index: decoder layer index, 0-based.
        block: the decoder block that holds this MLP.
        down: the dense part's projection whose input is the intermediate activation ``[B, T, I]``
            (a MoE layer's shared expert; None for a MoE layer without one).
        inputs: the dense part's input-side projections (gate/up, fc, or fused gate_up).
        size: number of neurons in this layer (experts' units, then the dense part's).
        experts: the routed experts of a MoE layer (None for a dense MLP); they take ids ``[0, E * I)``.
    """

    index: int
    block: nn.Module
    down: Projection | None
    inputs: tuple[Projection, ...]
    size: int
    experts: ExpertBank | None = None

    @property
    def dense_offset(self) -> int:
        """Layer id of the dense part's unit 0 (after the experts' units)."""
        return self.experts.units if self.experts is not None else 0

    def weight(self) -> torch.Tensor:
        """A weight of this layer (for its device, dtype and a fingerprint sample)."""
        return self.down.base.weight if self.down is not None else self.experts.module.down_proj  # type: ignore[union-attr]


def _base_layer(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def _as_projection(name: str, module: nn.Module) -> Projection | None:
    base = _base_layer(module)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or len(dist.shape(weight)) != 2:
        return None
    if isinstance(base, nn.Linear):
        return Projection(name, module, base.in_features, base.out_features, transposed=False)
    if type(base).__name__ == "Conv1D":  # GPT-2 style: y = x @ W + b with W [in, out]
        return Projection(name, module, *dist.shape(weight), transposed=True)
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
            "children; expected an input-side projection and a down projection."
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


def _expert_bank(model_name: str, prefix: str, mlp: nn.Module) -> ExpertBank | None:
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return None
    inner = _base_layer(experts)
    weight = getattr(inner, "gate_up_proj", None)
    if not isinstance(weight, torch.Tensor) or len(dist.shape(weight)) != 3 or not getattr(inner, "has_gate", True):
        raise UnsupportedModelError(
            f"{model_name}: MoE layer '{prefix}' has experts ({type(inner).__name__}) without a stacked 3-D "
            "'gate_up_proj' (transformers 5's fused expert layout); per-expert module lists and ungated "
            "experts are not supported."
        )
    transposed = bool(getattr(inner, "is_transposed", False))
    num_experts, width = dist.shape(weight)[0], dist.shape(weight)[2 if transposed else 1]
    return ExpertBank(f"{prefix}.experts", inner, num_experts, width // 2, transposed,
                      bool(getattr(inner, "is_concatenated", True)), adapted=inner is not experts)


def _mlp_layer(model_name: str, index: int, block: nn.Module, prefix: str, mlp: nn.Module) -> MLPLayer:
    bank = _expert_bank(model_name, prefix, mlp)
    if bank is None:
        down, inputs = _split_mlp(model_name, prefix, mlp)
        return MLPLayer(index=index, block=block, down=down, inputs=inputs, size=down.in_features)
    shared_name = next((n for n in SHARED_EXPERT_NAMES if isinstance(getattr(mlp, n, None), nn.Module)), None)
    if shared_name is None:
        return MLPLayer(index=index, block=block, down=None, inputs=(), size=bank.units, experts=bank)
    down, inputs = _split_mlp(model_name, f"{prefix}.{shared_name}", getattr(mlp, shared_name))
    return MLPLayer(index=index, block=block, down=down, inputs=inputs, size=bank.units + down.in_features, experts=bank)


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
        layers.append(_mlp_layer(model_name, i, block, f"{stack_name}.{i}.{mlp_attr}", getattr(block, mlp_attr)))
    return layers
