"""The neuron atlas: which MLP neurons are safety-critical, their controls and base references.

A neuron is ``(layer, j)``: unit ``j`` of layer ``layer``'s intermediate activation (see
:mod:`rimguard.hooks.arch`). The atlas stores

* ``tracked`` ``[N, 2]``: every neuron rimguard follows (safety set and controls), layer-major;
* ``safety`` ``[n]``: positions of the safety-critical neurons in ``tracked``;
* ``controls`` ``[K, n]``: positions of K random control sets, each matched to the safety set
  layer by layer (same count per layer, disjoint from it);
* ``score`` ``[n]``: the selection score of each safety neuron (share of pairs, or effect size);
* ``ranking`` ``[total]``: the selection score of *every* MLP neuron, layer-major (share of pairs
  with ties broken by the mean contrast, or effect size); sizes freeze sets by share. Atlases
  saved before it existed load without it;
* the safety probes themselves (prompt and the base model's greedy response), the selection
  settings, and a fingerprint of the model;
* optionally, the *refusal attention heads* (:mod:`rimguard.atlas.heads`): ``heads [k, 2]``
  ``(layer, head)``, best first, their base attention mass on a reasoning span at the answer position
  ``head_mass [k]`` and selection score ``head_score [k]``, with the reasoning passages they were
  measured with and the number of heads per layer.

It is saved as ``atlas.safetensors`` plus ``atlas.json`` in one folder. Format 2 dropped the base
references of format 1 (the monitor takes its own at train start); format 3 added the refusal heads.
Atlases of formats 1 and 2 still load (with no heads). The selection math is in
:mod:`rimguard.atlas.selection` and :mod:`rimguard.atlas.head_selection`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from rimguard import dist
from rimguard.atlas import selection
from rimguard.atlas.head_selection import HeadSelection
from rimguard.atlas.heads import identify_heads
from rimguard.atlas.selection import Moments
from rimguard.files import write_atomic
from rimguard.hooks.arch import MLPLayer, find_mlp_layers
from rimguard.hooks.capture import ActivationCapture
from rimguard.passes import activations, chunks, generate, pad_id, tokenize_dialogues
from rimguard.probes import bundled
from rimguard.schema import Reader

if TYPE_CHECKING:
    from rimguard.config import GuardConfig
    from rimguard.probes import ProbeSources

logger = logging.getLogger("rimguard")
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
METHODS = ("counterfactual", "effect_size")


class AtlasError(ValueError):
    """The atlas cannot be built, read, or used with this model."""


def _weight_sample(layers: Sequence[MLPLayer]) -> torch.Tensor:
    """``[L, 16]`` fp32: the first 16 values of each down projection's base weight (LoRA does not change them)."""
    return torch.stack([dist.full(layer.weight()).detach().reshape(-1)[:16].float().cpu() for layer in layers])


def fingerprint(model: nn.Module, layers: Sequence[MLPLayer] | None = None) -> dict[str, Any]:
    """Structure of the model plus a sample of weights of every down projection.

    ``weights_sample`` (16 values of row 0 of each down projection's base weight) tells apart
    different checkpoints of one architecture; it is compared with a tolerance of half a bf16 ulp
    relative, so a bf16/fp16 copy of the same model matches and another checkpoint does not.
    LoRA adapters do not change it. ``weights_sha256`` digests the same values (for display).
    """
    layers = layers if layers is not None else find_mlp_layers(model)
    sample = _weight_sample(layers)
    config = getattr(model, "config", None)
    return {
        "model_class": type(getattr(model, "get_base_model", lambda: model)()).__name__,
        "model_type": getattr(config, "model_type", None),
        "layer_sizes": [layer.size for layer in layers],
        "experts": [[layer.experts.num_experts, layer.experts.size] if layer.experts is not None else None for layer in layers],
        "weights_sha256": hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16],
        "weights_sample": sample.tolist(),
    }


SAMPLE_RTOL = 2.0**-8  # bf16 keeps 8 significant bits: a cast moves a value by at most half that, relative


def same_weights(ours: dict[str, Any], model_sample: torch.Tensor) -> bool:
    """Whether a model's weight sample matches a fingerprint's, up to a reduced-precision cast."""
    if "weights_sample" not in ours:  # an atlas saved before samples were stored: exact digest only
        return hashlib.sha256(model_sample.numpy().tobytes()).hexdigest()[:16] == ours.get("weights_sha256")
    saved = torch.tensor(ours["weights_sample"], dtype=torch.float32)
    return saved.shape == model_sample.shape and torch.allclose(model_sample, saved, rtol=SAMPLE_RTOL, atol=1e-30)


@dataclass
class NeuronAtlas:
    """Safety-critical neurons, matched controls and base references (see module docstring)."""

    tracked: torch.Tensor
    safety: torch.Tensor
    controls: torch.Tensor
    score: torch.Tensor
    probe_prompts: list[str]
    probe_responses: list[str]
    settings: dict[str, Any]
    model_fingerprint: dict[str, Any]
    ranking: torch.Tensor | None = None
    heads: HeadSelection | None = None  # the refusal heads; None: not identified
    reasoning_spans: list[str] = field(default_factory=list)  # the passages the heads were measured with

    # -- views -------------------------------------------------------------------------------
    @property
    def num_safety(self) -> int:
        return int(self.safety.numel())

    @property
    def layer_sizes(self) -> list[int]:
        return list(self.model_fingerprint["layer_sizes"])

    def per_layer(self) -> list[torch.Tensor]:
        """Tracked neuron ids for each layer, as ``[n_l]`` long tensors (input to the capture)."""
        return [self.tracked[self.tracked[:, 0] == layer, 1].contiguous() for layer in range(len(self.layer_sizes))]

    def safety_neurons(self) -> torch.Tensor:
        """``[n, 2]`` (layer, neuron) of the safety-critical set."""
        return self.tracked[self.safety]

    def safety_per_layer(self) -> list[torch.Tensor]:
        """Safety neuron ids per layer (``[n_l]`` long tensors; empty where a layer has none)."""
        neurons = self.safety_neurons()
        return [neurons[neurons[:, 0] == layer, 1].contiguous() for layer in range(len(self.layer_sizes))]

    @property
    def num_heads(self) -> int:
        """Number of refusal heads (0 if none were identified)."""
        return 0 if self.heads is None else int(self.heads.heads.shape[0])

    def same_selection(self, other: "NeuronAtlas") -> bool:
        """True if ``other`` tracks the same neurons with the same safety and control sets, and the same refusal heads."""
        mine, theirs = (a.heads.heads if a.heads is not None else None for a in (self, other))
        same_heads = mine is None and theirs is None or mine is not None and theirs is not None and torch.equal(mine, theirs)
        return same_heads and all(torch.equal(getattr(self, k), getattr(other, k)) for k in ("tracked", "safety", "controls"))

    def top_share_per_layer(self, share: float) -> list[torch.Tensor]:
        """The ``share`` of all MLP neurons with the highest ``ranking``, as ``[n_l]`` ids per layer."""
        if self.ranking is None:
            raise AtlasError("this atlas has no ranking of all neurons (saved by an older rimguard); identify it again to use freeze_share")
        return selection.top_share_per_layer(self.ranking, self.layer_sizes, share)

    def per_expert(self) -> dict[int, dict[str, int]]:
        """For each mixture-of-experts layer holding safety neurons: how many each expert holds
        (``"e3"``: expert 3; ``"shared"``: the shared expert). Empty for a dense model."""
        out: dict[int, dict[str, int]] = {}
        for layer, unit in self.safety_neurons().tolist():
            experts = (self.model_fingerprint.get("experts") or [None] * len(self.layer_sizes))[layer]
            if experts is None:
                continue
            count, width = experts
            key = f"e{unit // width}" if unit < count * width else "shared"
            out.setdefault(layer, {})
            out[layer][key] = out[layer].get(key, 0) + 1
        return {layer: dict(sorted(c.items(), key=lambda kv: (kv[0] == "shared", int(kv[0][1:]) if kv[0] != "shared" else 0)))
                for layer, c in out.items()}

    def summary(self) -> str:
        counts = torch.bincount(self.safety_neurons()[:, 0], minlength=len(self.layer_sizes)).tolist()
        fp = self.model_fingerprint
        lines = [
            f"NeuronAtlas: {self.num_safety} safety-critical neurons, {self.controls.shape[0]} control sets",
            f"model: {fp['model_class']} ({fp['model_type']}), {len(fp['layer_sizes'])} layers, weights {fp['weights_sha256']}",
            "settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()),
            "neurons per layer: " + " ".join(f"L{i}:{c}" for i, c in enumerate(counts) if c),
        ]
        experts = self.per_expert()
        if experts:
            lines.append("neurons per expert (mixture of experts; e<k>: expert k):")
            lines += [f"  L{layer}: " + " ".join(f"{k}:{v}" for k, v in c.items()) for layer, c in sorted(experts.items())]
        lines.append(f"safety probes: {len(self.probe_prompts)}")
        if self.heads is None or not self.num_heads:
            lines.append("refusal heads: " + ("not identified" if self.heads is None else "none eligible"))
        else:
            lines.append(f"refusal heads: {self.num_heads} (layer, head, base attention mass on the reasoning span)")
            lines += [f"  L{layer} H{head}  mass {mass:.4f}" for (layer, head), mass in zip(self.heads.heads.tolist(), self.heads.mass.tolist())]
        return "\n".join(lines)

    # -- checks ------------------------------------------------------------------------------
    def check_model(self, model: nn.Module, layers: Sequence[MLPLayer] | None = None, check_weights: bool = True) -> None:
        """Raise :class:`AtlasError` if ``model`` is not the model this atlas was built on (a copy of it
        in another dtype is the same model)."""
        layers = layers if layers is not None else find_mlp_layers(model)
        theirs, ours = fingerprint(model, layers), self.model_fingerprint
        diff = [k for k in ("model_class", "layer_sizes") if theirs.get(k) != ours.get(k)]
        if diff:
            details = "; ".join(f"{k}: atlas has {ours.get(k)!r}, model has {theirs.get(k)!r}" for k in diff)
            raise AtlasError(f"this atlas was built for a different model ({details})")
        if check_weights and not same_weights(ours, _weight_sample(layers)):
            raise AtlasError(
                f"this atlas was built on other weights of the same architecture ({ours.get('model_class')}, "
                f"{len(self.layer_sizes)} layers): its weights fingerprint is {ours.get('weights_sha256')}, the model's "
                f"{theirs['weights_sha256']} (beyond a dtype cast). Identify the atlas on the model you train, or pass "
                "the checkpoint the atlas was identified on"
            )

    # -- io ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``atlas.safetensors`` and ``atlas.json`` into ``directory``; returns it. Each file is written
        atomically, the JSON last: it holds the tensors' checksum, so a reader never takes a mix of two saves."""
        directory = Path(directory)
        names = ("tracked", "safety", "controls", "score") + (("ranking",) if self.ranking is not None else ())
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in names}
        if self.heads is not None:
            tensors.update(heads=self.heads.heads, head_mass=self.heads.mass, head_score=self.heads.score)
        data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        write_atomic(directory / "atlas.safetensors", data)
        meta = {
            "format_version": FORMAT_VERSION,
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
            "settings": self.settings,
            "fingerprint": self.model_fingerprint,
            "probe_prompts": self.probe_prompts,
            "probe_responses": self.probe_responses,
        }
        if self.heads is not None:
            meta.update(heads_per_layer=self.heads.heads_per_layer, reasoning_spans=self.reasoning_spans)
        write_atomic(directory / "atlas.json", json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronAtlas":
        """Read an atlas folder, checking every field (types, shapes, index ranges, the tensor
        checksum); any defect is an :class:`AtlasError` naming the file and the field."""
        directory = Path(directory)
        if not (directory / "atlas.json").is_file() and not (directory / "atlas.safetensors").is_file():
            raise AtlasError(f"{directory}: not an atlas folder (no atlas.json or atlas.safetensors)")
        r, name, tname = Reader(directory, AtlasError), "atlas.json", "atlas.safetensors"
        meta = r.json(name)
        if meta.get("format_version") not in READABLE_FORMATS:
            raise AtlasError(f"{directory}: atlas format {meta.get('format_version')!r} (this rimguard reads formats "
                             f"{READABLE_FORMATS}); identify the atlas again with this version")
        fp = r.field(meta, "fingerprint", dict, name)
        sizes = fp.get("layer_sizes")
        if not isinstance(sizes, list) or not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            r.fail(directory / name, "field 'fingerprint.layer_sizes' must be a non-empty list of positive integers")
        prompts = r.strings(meta, "probe_prompts", name)
        responses = r.strings(meta, "probe_responses", name, nonempty=False)
        if len(responses) != len(prompts):
            r.fail(directory / name, f"field 'probe_responses' has {len(responses)} entries for {len(prompts)} probe_prompts")
        settings = r.field(meta, "settings", dict, name)
        tensors = r.tensors(tname, meta.get("tensors_sha256"))
        tracked = r.tensor(tensors, "tracked", tname, False, (None, 2))
        n_tracked = tracked.shape[0]
        safety = r.tensor(tensors, "safety", tname, False, (None,))
        if safety.numel() == 0:
            r.fail(directory / tname, "tensor 'safety' is empty: the atlas selects no neurons")
        r.indices(tracked[:, 0], "tracked (layer)", tname, len(sizes))
        r.indices(tracked[:, 1], "tracked (neuron)", tname, torch.tensor(sizes)[tracked[:, 0].clamp(0, len(sizes) - 1)])
        r.indices(safety, "safety", tname, n_tracked)
        controls = r.tensor(tensors, "controls", tname, False, (None, safety.numel()))
        r.indices(controls, "controls", tname, n_tracked)
        heads, spans = _read_heads(r, meta, tensors, len(sizes))
        return cls(
            tracked=tracked, safety=safety, controls=controls,
            score=r.tensor(tensors, "score", tname, True, (safety.numel(),)),
            ranking=r.tensor(tensors, "ranking", tname, True, (sum(sizes),), optional=True),
            probe_prompts=prompts, probe_responses=responses, settings=settings, model_fingerprint=fp,
            heads=heads, reasoning_spans=spans,
        )

    # -- identification ----------------------------------------------------------------------
    @classmethod
    def from_config(cls, model: nn.Module, tokenizer, config: "GuardConfig", sources: "ProbeSources | None" = None,
                    capture: ActivationCapture | None = None, progress: bool = False) -> "NeuronAtlas":
        """:meth:`identify` with the settings of ``config`` (:meth:`GuardConfig.identify_options`) on the prompt
        sets of ``sources`` (bundled by default): its first ``num_safety_probes`` harmful prompts, the intent
        sentences (counterfactual method) and harmless prompts (effect size, or refusal heads)."""
        from rimguard.probes import ProbeSources

        sources = sources or ProbeSources()
        method, heads = config.atlas.method, config.atlas.refusal_heads
        logger.info("rimguard: identifying safety-critical neurons on %d prompts", config.atlas.num_safety_probes)
        dtype = next(model.parameters()).dtype
        if dtype in (torch.bfloat16, torch.float16):
            logger.warning("rimguard: identifying the safety neurons under %s; the selection can differ from an fp32 one. "
                           "Identify once in fp32 (rimguard identify MODEL_DIR -o atlas/) and pass atlas='atlas/' to reuse it.",
                           str(dtype).replace("torch.", ""))
        harmful = sources.load("harmful")[: config.atlas.num_safety_probes]
        intents = sources.load("intent") if method == "counterfactual" else []
        harmless = sources.load("harmless") if method == "effect_size" or heads > 0 else []
        spans = sources.load("reasoning_spans") if heads else []
        return cls.identify(model, tokenizer, harmful, intents, harmless, capture=capture, reasoning_spans=spans,
                            progress=progress, **config.identify_options())

    @classmethod
    def identify(
        cls,
        model: nn.Module,
        tokenizer,
        harmful: Sequence[str],
        intents: Sequence[str] = (),
        harmless: Sequence[str] = (),
        method: str = "counterfactual",
        top_m: int | float = 0.01,
        min_share: float = 0.5,
        num_controls: int = 32,
        max_new_tokens: int = 24,
        max_length: int = 256,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = True,
        capture: ActivationCapture | None = None,
        refusal_heads: int = 0,
        reasoning_spans: Sequence[str] = (),
    ) -> "NeuronAtlas":
        """Find the safety-critical neurons of ``model``.

        Args:
            harmful: harmful requests (the paper's D).
            intents: malicious-intent sentences; pair k appends ``intents[k % len]`` to request k (D~).
            harmless: harmless requests (needed by ``method="effect_size"``).
            method: ``"counterfactual"`` (paper: top-m of ``f(D~_k) - f(D_k)`` per pair, kept if in
                at least a share ``min_share`` of pairs; 1.0 is the paper's intersection) or
                ``"effect_size"`` (top-m of Cohen's d, harmful vs harmless).
            top_m: neurons kept per pair: a count, or a fraction of all neurons if < 1.
            num_controls: number K of random control sets.
            max_new_tokens: length of the model's own greedy response appended to each prompt.
            capture: the guard's hook layer on ``model`` (attached); by default one is made and removed here.
            refusal_heads: also find this many refusal attention heads (:mod:`rimguard.atlas.heads`; needs
                ``harmless``, the compliance side); 0: none.
            reasoning_spans: the reasoning passages placed before the answer for the heads (default: bundled).

        Activations are taken over the chat-formatted request plus that response, padding excluded.
        """
        if method not in METHODS:
            raise AtlasError(f"unknown method '{method}'; choose one of {METHODS}")
        if not harmful:
            raise AtlasError("no harmful prompts given")
        if method == "counterfactual" and not intents:
            raise AtlasError("method='counterfactual' needs malicious-intent sentences (intents=)")
        if method == "effect_size" and (len(harmful) < 2 or len(harmless) < 2):
            raise AtlasError(f"method='effect_size' needs at least 2 prompts per side for a variance (got {len(harmful)} harmful, "
                             f"{len(harmless)} harmless)")
        if not 0 < min_share <= 1:
            raise AtlasError(f"min_share must be in (0, 1], got {min_share}")
        if refusal_heads < 0 or refusal_heads and not harmless:
            raise AtlasError(f"refusal_heads={refusal_heads}: must be >= 0, and finding heads needs harmless prompts (harmless=)")
        spans = list(reasoning_spans) or (bundled("reasoning_spans") if refusal_heads else [])

        own = capture is None
        capture = ActivationCapture(model, find_mlp_layers(model)) if own else capture
        layers = capture.layers
        total = sum(layer.size for layer in layers)
        m = max(1, int(round(top_m * total))) if top_m < 1 else int(top_m)
        if not 1 <= m <= total:
            raise AtlasError(f"top_m={top_m} gives {m} neurons; the model has {total}")
        pid = pad_id(tokenizer)
        sizes = [layer.size for layer in layers]
        if own:
            capture.attach()
        bar = _Stages(progress, 3 if refusal_heads else 2)
        try:
            _refuse_non_finite_weights(model)
            harmful = list(harmful)
            contrast = [f"{h} {intents[k % len(intents)]}" for k, h in enumerate(harmful)] if method == "counterfactual" else list(harmless)
            prompts = harmful + contrast
            _refuse_long(tokenize_dialogues(tokenizer, prompts, max_length=None), prompts, max_length, "prompt")
            bar.stage("generating responses")
            responses = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc="responses" if progress else None,
                                 max_length=max_length)
            bar.stage("measuring activations")
            dialogues = tokenize_dialogues(tokenizer, prompts, responses, max_length=None)
            _refuse_long(dialogues, prompts, max_length, "prompt with its response")
            found = _select(model, capture, dialogues, len(harmful), method, m, min_share, pid, batch_size, progress)
            flat_safety = found.chosen.cpu()
            controls = selection.matched_controls(flat_safety, sizes, num_controls, seed)
            heads = None
            if refusal_heads:
                bar.stage("finding refusal heads")
                heads = identify_heads(model, layers, tokenizer, harmful, harmless, spans, refusal_heads, max_length, batch_size)
        except selection.SelectionError as err:
            raise AtlasError(str(err)) from None
        finally:
            if own:
                capture.remove()
            bar.close()
        tracked, safety_pos, control_pos = selection.tracked_layout(flat_safety, controls, sizes)
        return cls(
            tracked=tracked,
            safety=safety_pos,
            controls=control_pos,
            score=found.score.float().cpu(),
            ranking=found.ranking.float().cpu(),
            probe_prompts=harmful,
            probe_responses=responses[: len(harmful)],
            settings={
                "method": method,
                "top_m": m,
                "min_share": min_share if method == "counterfactual" else None,
                "pairs": len(harmful),
                "num_controls": num_controls,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
                "refusal_heads": refusal_heads,
            },
            model_fingerprint=fingerprint(model, layers),
            heads=heads,
            reasoning_spans=spans if heads is not None else [],
        )


PAIR_CHUNK = 64  # harmful prompts (or pairs) measured at a time: identification memory is O(neurons * PAIR_CHUNK)


def _select(model: nn.Module, capture: ActivationCapture, dialogues: Sequence[Sequence[int]], n_harmful: int, method: str,
            m: int, min_share: float, pad_value: int, batch_size: int, progress: bool) -> selection.Selection:
    """Both sides streamed: the counterfactual rule's per-pair sums (:class:`selection.PairTally`) chunk by chunk,
    or each side's moments for the effect size; no ``[prompts, neurons]`` matrix is ever held."""
    if method == "effect_size":
        base = activation_moments(model, capture, dialogues[:n_harmful], pad_value, batch_size, full=True,
                                  desc="activations" if progress else None)
        other = activation_moments(model, capture, dialogues[n_harmful:], pad_value, batch_size, full=True)
        for side in (base, other):
            _refuse_non_finite(side.mean)
        return selection.effect_size(base, other, m)
    tally = None
    starts = range(0, n_harmful, PAIR_CHUNK)
    for lo in tqdm(starts, desc="activations", disable=not progress or len(starts) < 2, leave=False):
        hi = min(lo + PAIR_CHUNK, n_harmful)
        base = activations(model, capture, dialogues[lo:hi], pad_value, batch_size, full=True)
        other = activations(model, capture, dialogues[n_harmful + lo : n_harmful + hi], pad_value, batch_size, full=True)
        for side in (base, other):
            _refuse_non_finite(side)
        part = selection.PairTally.of(base, other, m)
        tally = part if tally is None else tally.plus(part)
    assert tally is not None
    return selection.select_counterfactual(tally, m, min_share)


def _refuse_non_finite_weights(model: nn.Module) -> None:
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(dist.local(p).detach()).all() for _, p in named]).float()
    if dist.sharded(model):  # each rank checked its shard
        finite = dist.all_reduce_sum(finite) / dist.world_size()
    bad = [name for (name, _), ok in zip(named, finite.tolist()) if ok < 1]
    if bad:
        raise AtlasError(f"the model's weights hold NaN or inf values ({len(bad)} tensors, e.g. {bad[0]}): an atlas of them "
                         "would be meaningless; load finite weights")


def _refuse_non_finite(x: torch.Tensor) -> None:
    """Infinite activations (NaN is a MoE unit's 'no routed token', so only inf is a fault here)."""
    if bool(torch.isinf(x).any()):
        raise AtlasError("the model's activations on the probes overflow to inf: its weights or dtype cannot be measured "
                         "(try float32)")


def _refuse_long(sequences: Sequence[Sequence[int]], prompts: Sequence[str], max_length: int, what: str) -> None:
    """A probe cut at ``max_length`` loses its intent sentence or response: pairs become identical and the
    selection is the tie order. Refuse, naming the longest."""
    long = [i for i, seq in enumerate(sequences) if len(seq) > max_length]
    if long:
        worst = max(long, key=lambda i: len(sequences[i]))
        raise AtlasError(f"{len(long)} of {len(sequences)} probes do not fit max_length={max_length} tokens as {what} (the "
                         f"longest, {prompts[worst][:60]!r}..., has {len(sequences[worst])}): raise max_length or use "
                         f"shorter prompts")


def _read_heads(r: Reader, meta: dict[str, Any], tensors: dict[str, torch.Tensor], num_layers: int) -> tuple[HeadSelection | None, list[str]]:
    """The refusal heads of an atlas folder and their reasoning passages (None and [] when it holds no
    heads: formats 1 and 2 never do), every field checked."""
    name, tname = "atlas.json", "atlas.safetensors"
    heads = r.tensor(tensors, "heads", tname, False, (None, 2), optional=True)
    if heads is None:
        return None, []
    per_layer = r.field(meta, "heads_per_layer", int, name)
    if per_layer < 1:
        r.fail(r.folder / name, f"field 'heads_per_layer' must be >= 1, found {per_layer}")
    r.indices(heads[:, 0], "heads (layer)", tname, num_layers)
    r.indices(heads[:, 1], "heads (head)", tname, per_layer)
    if len({tuple(pair) for pair in heads.tolist()}) != heads.shape[0]:
        r.fail(r.folder / tname, "tensor 'heads' names a head twice")
    mass = r.tensor(tensors, "head_mass", tname, True, (heads.shape[0],))
    r.values(mass, "head_mass", tname, 0.0, 1.0)
    score = r.tensor(tensors, "head_score", tname, True, (heads.shape[0],))
    r.values(score, "head_score", tname, -1.0, 1.0)
    return HeadSelection(heads, mass, score, per_layer), r.strings(meta, "reasoning_spans", name)


def activation_moments(
    model: nn.Module,
    capture: ActivationCapture,
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    batch_size: int = 8,
    full: bool = False,
    desc: str | None = None,
) -> Moments:
    """Mean and variance over sequences of the per-sequence max-over-tokens activations, accumulated
    batch by batch: memory ``O(N)`` (plus one ``[batch_size, N]`` batch), whatever the number of
    sequences. ``N`` as in :func:`activations`."""
    total = squares = counts = None
    for group in tqdm(list(chunks(sequences, batch_size)), desc=desc, disable=desc is None, leave=False):
        x = activations(model, capture, group, pad_value, batch_size, full=full).double()
        has = (~torch.isnan(x)).sum(0)  # a MoE unit counts only the sequences that routed to its expert
        x = x.nan_to_num(nan=0.0)
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        counts = has if counts is None else counts + has
    if total is None or squares is None or counts is None:
        raise ValueError("activation_moments needs at least one sequence")
    n = counts.clamp_min(1).double()
    mean = total / n
    var = (squares - n * mean * mean).clamp_min(0) / (n - 1).clamp_min(1)
    count: int | torch.Tensor = len(sequences) if bool((counts == len(sequences)).all()) else counts
    return Moments(mean.float(), var.float(), count)


class _Stages:
    """A small stage-level progress bar (the inner loops show their own)."""

    def __init__(self, enabled: bool, total: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc="rimguard atlas", disable=not enabled)
        self._started = False

    def stage(self, name: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_postfix_str(name)

    def close(self) -> None:
        if self._started:
            self._bar.update(1)
        self._bar.close()
