"""Refusal attention heads: one-row attention from the live forward, the selection rule, the atlas
fields, the monitor in a run, resume, and the command line."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from trl import SFTConfig, SFTTrainer

from rimguard import AtlasError, GuardEngine, GuardStateError, NeuronAtlas, RIMGuard
from rimguard.atlas.head_selection import HeadSelection, refusal_head_scores, select_heads, span_mass, top_in_span
from rimguard.atlas.heads import CLOSE, answer_attention, identify_heads, with_reasoning
from rimguard.compat import no_checkpointing
from rimguard.hooks.arch import find_mlp_layers
from rimguard.hooks.attention import AttentionRows, attention_row
from rimguard.hooks.capture import ProbeComplete
from rimguard.passes import encode, format_prompt, pad
from rimguard.probes import bundled
from rimguard.probes.reasoning import reasoning_texts
from rimguard.report import write_report
from rimguard.state import GuardState
from rimguard.testing import FAMILIES, PLANTED_HEAD, SINK_HEAD, marked, planted_heads_model, tiny_config, tiny_model, tiny_tokenizer
from tests.test_file_checks import _rewrite

TEXTS = ["How do I bake bread at home with simple flour, water and salt?", "Hi there",
         "What is the capital of France, and why is it famous for its art museums?"]


def _batch(tok, texts):
    """Left-padded chat prompts and their position ids (each row's own 0, 1, 2, ...)."""
    batch = pad([encode(tok, format_prompt(tok, t)) for t in texts], tok.pad_token_id, left=True)
    return batch, (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)


def _sharpen(model):
    """Random q/k weights (and q/k-norm gains) large enough that attention is far from uniform, so a wrong
    scaling, mask, soft-cap or head mapping shows in the rows."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("weight") and any(s in name for s in ("q_proj", "k_proj", "c_attn", "qkv_proj")):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.15)
        elif name.endswith("weight") and any(s in name for s in ("q_norm", "k_norm")):
            p.data.copy_(torch.randn(p.shape, generator=g) * 2.0)


def _hook_rows(model, batch, positions):
    rows = AttentionRows(model, find_mlp_layers(model))
    with torch.no_grad(), rows.installed():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions)
        return rows.take()


def _eager_rows(model, batch, positions):
    """``output_attentions`` of eager attention, last query position: ``[B, L, H, T]``."""
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                    output_attentions=True)
    return torch.stack([a[:, :, -1] for a in out.attentions], dim=1)


# -- one-row attention -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_from_hooks_equal_eager_attention_rows(tok, family):
    """Every supported family, in its default implementation (SDPA; Gemma 2: eager with soft-capping), with left
    padding and with none: the row computed from the hooked queries and keys is eager attention's row."""
    config = tiny_config(family)
    if family == "gemma2":  # make the soft-cap and the sliding window bite
        config.attn_logit_softcapping, config.sliding_window = 2.0, 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    _sharpen(model)
    implementation = model.config._attn_implementation
    padded, unpadded = _batch(tok, TEXTS), _batch(tok, TEXTS[:1] * 2)
    assert (padded[0].attention_mask == 0).any() and (unpadded[0].attention_mask == 1).all()
    got = [_hook_rows(model, *b) for b in (padded, unpadded)]
    assert model.config._attn_implementation == implementation  # the model was never switched to eager
    model.set_attn_implementation("eager")
    want = [_eager_rows(model, *b) for b in (padded, unpadded)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert want[0].amax() > 5 / padded[0].input_ids.shape[1]  # far from uniform: a wrong mask or scaling would show
    assert (got[0] * (padded[0].attention_mask == 0)[:, None, None]).sum() == 0  # padding gets no weight


def test_rows_with_lora_on_q_and_k_equal_eager_rows(tok):
    model = tiny_model("llama").eval()
    _sharpen(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    batch = _batch(tok, TEXTS)
    got = _hook_rows(peft, *batch)
    with peft.disable_adapter():
        base = _hook_rows(peft, *batch)
    peft.get_base_model().set_attn_implementation("eager")
    torch.testing.assert_close(got, _eager_rows(peft, *batch), rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 0.05  # the adapter changes the rows: they come from the adapted q and k


def test_attention_row_reads_every_mask_form_alike():
    """A 2-D padding mask (flash attention) with a sliding window, a 4-D boolean mask (SDPA) and a 4-D additive
    mask (eager) give the same row; no mask means every key."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    causal = torch.ones(7, 7).tril().bool()
    window = torch.arange(7)[None, :] > torch.arange(7)[:, None] - 3  # each query sees itself and the 2 keys before
    keep = (padding.bool()[:, None, :] & causal & window)[:, None]  # [B, 1, T, T]
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    flash = attention_row(q, k, padding, scaling=0.3, sliding_window=3)
    torch.testing.assert_close(flash, attention_row(q, k, keep, scaling=0.3))
    torch.testing.assert_close(flash, attention_row(q, k, additive, scaling=0.3))
    assert (flash[:, :, :4] == 0).all() and torch.allclose(flash.sum(-1), torch.ones(2, 4))
    # by hand: query head 3 reads key head 1 (groups of 2), scaled and soft-capped, over all 7 keys
    logits = (q[:, 3, -1, None, :] * k[:, 1]).sum(-1) * 0.3  # [B, T]
    hand = (torch.tanh(logits / 0.5) * 0.5).softmax(-1)
    torch.testing.assert_close(attention_row(q, k, None, scaling=0.3, softcap=0.5)[:, 3], hand)


def test_nothing_stays_installed_and_outputs_are_unchanged(tok):
    model = tiny_model("llama").eval()
    batch, positions = _batch(tok, TEXTS)
    with torch.no_grad():
        before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
    rows = AttentionRows(model, find_mlp_layers(model), record=[0], stop_early=True)
    with pytest.raises(ProbeComplete), torch.no_grad(), rows.installed():  # stops after layer 0
        assert "get_interface" in vars(ALL_ATTENTION_FUNCTIONS)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)  # removed although the block raised
    full = AttentionRows(model, find_mlp_layers(model))
    other = tiny_model("qwen2").eval()
    with torch.no_grad(), full.installed():
        during = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits
        assert full.take().shape == (3, 2, 4, batch.input_ids.shape[1])
        other(input_ids=batch.input_ids)  # another model's attention passes through, unrecorded
        with pytest.raises(Exception, match="no attention call was seen"):
            full.take()
    torch.testing.assert_close(during, before, rtol=0, atol=0)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS) and model.config._attn_implementation == "sdpa"


# -- the selection rule, by hand -----------------------------------------------------------------
def test_span_mass_and_top_by_hand():
    rows = torch.tensor([[[0.1, 0.5, 0.3, 0.1], [0.6, 0.1, 0.1, 0.2]],
                         [[0.0, 0.2, 0.2, 0.6], [0.0, 0.7, 0.2, 0.1]]])  # [B=2, H=2, T=4]
    spans = torch.tensor([[1, 3], [2, 4]])  # row 0: keys 1, 2; row 1: keys 2, 3
    torch.testing.assert_close(span_mass(rows, spans), torch.tensor([[0.8, 0.2], [0.8, 0.3]]))
    assert top_in_span(rows, spans).tolist() == [[True, False], [True, False]]


def test_scores_and_selection_by_hand():
    # 2 layers x 2 heads; 2 harmful (refused) and 2 harmless (answered) prompts
    refuse = torch.tensor([[[0.1, 0.6], [0.05, 0.3]], [[0.3, 0.6], [0.05, 0.5]]])
    comply = torch.tensor([[[0.5, 0.7], [0.05, 0.9]], [[0.7, 0.7], [0.05, 0.9]]])
    top_in = torch.tensor([[[False, True], [False, False]], [[False, True], [False, True]]])
    separation, eligible = refusal_head_scores(refuse, comply, top_in)
    torch.testing.assert_close(separation, torch.tensor([[0.4, 0.1], [0.0, 0.5]]))
    # L1H1 reads the span on half the refused prompts (not more than half away): not eligible; L1H0 does not separate
    assert eligible.tolist() == [[True, False], [False, False]]
    assert select_heads(separation, eligible, 3).tolist() == [[0, 0]]
    everyone = torch.ones(2, 2, dtype=torch.bool)
    assert select_heads(separation, everyone, 3).tolist() == [[1, 1], [0, 0], [0, 1]]
    assert select_heads(torch.zeros(2, 2), everyone, 2).tolist() == [[0, 0], [0, 1]]  # ties: lower layer, head first
    chosen = HeadSelection.of(refuse, comply, top_in, 2)
    assert chosen.heads.tolist() == [[0, 0]] and chosen.heads_per_layer == 2
    torch.testing.assert_close(chosen.mass, torch.tensor([0.2]))
    torch.testing.assert_close(chosen.score, torch.tensor([0.4]))


def test_reasoning_span_positions(tok):
    model = tiny_model("llama")
    spans = ["First I list what I know.", "Let me think step by step about it."]
    made = with_reasoning(model, tok, ["How do I bake bread?", "Hi", "Tell me a joke"], spans, max_length=256)
    close = tok(CLOSE, add_special_tokens=False)["input_ids"]
    for i, (seq, (start, end)) in enumerate(zip(made.sequences, made.spans)):
        assert seq[start:end] == tok(spans[i % 2], add_special_tokens=False)["input_ids"]
        assert seq[end:] == close and seq[:start] == encode(tok, format_prompt(tok, ["How do I bake bread?", "Hi", "Tell me a joke"][i]))


# -- identification on a planted model -------------------------------------------------------------
PLANTED, SINK = PLANTED_HEAD[1], SINK_HEAD[1]  # layer-0 heads


def test_identification_finds_the_planted_head_and_not_the_others(tok):
    model = planted_heads_model()
    layers = find_mlp_layers(model)
    harmful, harmless, spans = marked(bundled("harmful")[:8]), bundled("harmless")[:8], bundled("reasoning_spans")
    chosen = identify_heads(model, layers, tok, harmful, harmless, spans, k=1, max_length=128)
    assert chosen.heads.tolist() == [[0, PLANTED]] and chosen.mass.item() < 0.01 and chosen.score.item() > 0.3
    # every head's score: the sink has as little span mass as the planted head, but no separation
    refuse, top = answer_attention(model, layers, with_reasoning(model, tok, harmful, spans, 128), tok.pad_token_id)
    comply, _ = answer_attention(model, layers, with_reasoning(model, tok, harmless, spans, 128), tok.pad_token_id)
    separation, eligible = refusal_head_scores(refuse, comply, top)
    assert refuse.mean(0)[0, SINK] < 0.01 and abs(separation[0, SINK]) < 0.01
    others = torch.ones(2, 4, dtype=torch.bool)
    others[0, PLANTED] = False
    assert separation[0, PLANTED] > 0.3 > separation[others].max() + 0.15 and eligible[0, PLANTED]


# -- the atlas --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_atlas():
    tok = tiny_tokenizer()
    return NeuronAtlas.identify(planted_heads_model(), tok, marked(bundled("harmful")[:8]), bundled("intent"), bundled("harmless")[:8],
                                top_m=10, min_share=0.25, num_controls=4, max_new_tokens=4, max_length=128, progress=False,
                                refusal_heads=2)


def test_atlas_stores_the_heads_and_reads_them_back(tmp_path, head_atlas):
    assert head_atlas.heads.heads[0].tolist() == [0, PLANTED] and head_atlas.reasoning_spans == bundled("reasoning_spans")
    assert head_atlas.settings["refusal_heads"] == 2
    loaded = NeuronAtlas.load(head_atlas.save(tmp_path / "a"))
    for name in ("heads", "mass", "score"):
        assert torch.equal(getattr(loaded.heads, name), getattr(head_atlas.heads, name))
    assert loaded.heads.heads_per_layer == 4 and loaded.reasoning_spans == head_atlas.reasoning_spans
    assert loaded.same_selection(head_atlas)
    assert f"L0 H{PLANTED}  mass {head_atlas.heads.mass[0].item():.4f}" in loaded.summary()
    none = dataclasses.replace(head_atlas, heads=HeadSelection(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0), torch.zeros(0), 4))
    back = NeuronAtlas.load(none.save(tmp_path / "none"))
    assert back.heads is not None and back.num_heads == 0 and "refusal heads: none eligible" in back.summary()


def test_a_format_2_atlas_loads_with_no_heads(tmp_path, llama_atlas):
    folder = llama_atlas.save(tmp_path / "v2")
    _rewrite(folder, "atlas", meta=lambda m: m.update(format_version=2))
    loaded = NeuronAtlas.load(folder)
    assert loaded.heads is None and loaded.num_heads == 0 and loaded.same_selection(llama_atlas)
    assert "refusal heads: not identified" in loaded.summary()


HEAD_DEFECTS = {
    "heads per layer missing": (lambda m: m.pop("heads_per_layer"), None, "'heads_per_layer' is missing"),
    "heads per layer zero": (lambda m: m.update(heads_per_layer=0), None, "'heads_per_layer' must be >= 1"),
    "spans missing": (lambda m: m.pop("reasoning_spans"), None, "'reasoning_spans' is missing"),
    "head beyond the layer": (None, lambda t: t["heads"].__setitem__((0, 1), 4), "'heads (head)' holds index 4"),
    "layer beyond the model": (None, lambda t: t["heads"].__setitem__((0, 0), 2), "'heads (layer)' holds index 2"),
    "float heads": (None, lambda t: t.update(heads=t["heads"].float()), "'heads' must be integer"),
    "heads as a vector": (None, lambda t: t.update(heads=t["heads"][:, 0].contiguous()), "'heads' must have shape [*, 2]"),
    "a head twice": (None, lambda t: t.update(heads=t["heads"][[0, 0]], head_mass=t["head_mass"][[0, 0]],
                                              head_score=t["head_score"][[0, 0]]), "'heads' names a head twice"),
    "short masses": (None, lambda t: t.update(head_mass=t["head_mass"][:1]), "'head_mass' must have shape [2]"),
    "mass above one": (None, lambda t: t["head_mass"].__setitem__(0, 1.5), "'head_mass' holds 1.5"),
    "nan score": (None, lambda t: t["head_score"].__setitem__(0, float("nan")), "'head_score' holds nan"),
    "scores missing": (None, lambda t: t.pop("head_score"), "'head_score' is missing"),
}


@pytest.mark.parametrize("case", sorted(HEAD_DEFECTS))
def test_head_field_defects_are_atlas_errors_naming_file_and_field(tmp_path, head_atlas, case):
    meta, tensors, message = HEAD_DEFECTS[case]
    assert head_atlas.num_heads == 2
    folder = head_atlas.save(tmp_path / "atlas")
    _rewrite(folder, "atlas", meta, tensors)
    with pytest.raises(AtlasError, match=re.escape(message)) as err:
        NeuronAtlas.load(folder)
    assert str(folder) in str(err.value) and str(err.value).count("\n") == 0


def test_head_references_in_the_guard_state_are_checked(tmp_path, tok, fast_config, head_atlas):
    """A saved head reference reads back; a corrupt one is a GuardStateError naming the file and the tensor; a
    resume that monitors another number of heads is refused."""
    engine = GuardEngine(fast_config(refusal_heads=2, max_length=128), atlas=head_atlas)
    engine.setup(planted_heads_model(), tok, inject_loss=False)
    folder = tmp_path / "checkpoint-2" / "rimguard"
    engine.state().save(folder)
    engine.teardown()
    assert torch.equal(GuardState.read(folder).parts["heads"].tensors["ref_mass"], engine.heads.ref_mass)
    with pytest.raises(GuardStateError, match="refusal_heads changed"):
        GuardEngine(fast_config(refusal_heads=1, max_length=128)).setup(planted_heads_model(), tok, inject_loss=False,
                                                                         restored=GuardState.read(folder))
    _rewrite(folder, "state", tensors=lambda t: t["heads.ref_mass"].__setitem__(0, 2.0))
    with pytest.raises(GuardStateError, match=re.escape("'heads.ref_mass' holds 2.0")) as err:
        GuardState.read(folder)
    assert str(folder) in str(err.value)


def test_cli_identify_and_inspect_show_the_heads(tmp_path, tok):
    model_dir = tmp_path / "model"
    planted_heads_model().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "harm.txt").write_text("\n".join(marked(bundled("harmful")[:8])) + "\n")
    exe = [sys.executable, "-m", "rimguard.cli"]
    proc = subprocess.run([*exe, "identify", str(model_dir), "--safety", str(tmp_path / "harm.txt"), "--refusal-heads", "1",
                           "--num-safety-probes", "8", "--max-new-tokens", "2", "--top-m", "10", "--min-share", "0.25",
                           "--num-controls", "4", "--max-length", "128", "-o", str(tmp_path / "atlas")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([*exe, "inspect", str(tmp_path / "atlas")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "neurons per layer: L" in proc.stdout
    assert "refusal heads: 1 (layer, head, base attention mass on the reasoning span)" in proc.stdout
    assert f"L0 H{PLANTED}  mass 0.00" in proc.stdout


# -- the monitor in a run ---------------------------------------------------------------------------
def _run(out, tok, fast_config, resume=None):
    guard = RIMGuard(fast_config(refusal_heads=2, probe_every=2, max_length=128), safety_prompts=marked(bundled("harmful")[:12]))
    args = SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, report_to=[],
                     bf16=False, **no_checkpointing(), save_strategy="steps", save_steps=2, use_cpu=True, max_length=64,
                     seed=0, disable_tqdm=True, logging_steps=100)
    trainer = SFTTrainer(model=planted_heads_model(), args=args, train_dataset=Dataset.from_list(reasoning_texts(24)),
                         processing_class=tok, callbacks=[guard])
    trainer.train(resume_from_checkpoint=resume)
    return guard


def test_a_guarded_run_logs_the_head_metrics_and_a_resume_restores_their_reference(tmp_path, tok, fast_config):
    first = _run(tmp_path, tok, fast_config)
    assert first.atlas.heads.heads[0].tolist() == [0, PLANTED] and first.engine.heads.count == first.atlas.num_heads
    ref = first.engine.heads.ref_mass.clone()
    events = [json.loads(line) for line in (tmp_path / "rimguard.jsonl").read_text().splitlines()]
    metrics = [e for e in events if e["event"] == "metrics"]
    assert [e["step"] for e in metrics] == [1, 2, 4]
    assert [e["refusal_heads"] for e in events if e["event"] == "start"] == [first.engine.heads.count]
    for record in metrics:
        assert 0 <= record["refusal_head_mass"] <= 1
        assert record["refusal_head_shift"] == pytest.approx(record["refusal_head_mass"] - ref.mean().item(), abs=1e-6)
    assert metrics[-1]["refusal_head_shift"] != 0  # training moved the heads' attention
    png, md = write_report(tmp_path)
    assert "| refusal_head_shift |" in md.read_text() and png.is_file()
    assert torch.equal(first.engine.heads.ref_mass, ref)

    resumed = _run(tmp_path, tok, fast_config, resume=str(tmp_path / "checkpoint-2"))
    assert torch.equal(resumed.engine.heads.ref_mass, ref)  # restored, not re-measured on the trained weights
    assert not torch.allclose(resumed.engine.heads.mass(), ref, atol=1e-6, rtol=0)  # re-measuring would have given other values
    later = lambda history: [(r["refusal_head_mass"], r["refusal_head_shift"]) for r in history if r["step"] == 4]  # noqa: E731
    assert later(resumed.history) == later(first.history)


def test_two_ranks_measure_what_one_process_measures(tmp_path):
    """Under torchrun (2 CPU ranks, gloo) each rank measures its share of the head probes; the all-reduced
    reference and check values are the same on both ranks and equal one process' mean over every probe."""
    script = Path(__file__).parent / "scripts" / "ddp_heads.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"heads{r}.json").read_text()) for r in (0, 1)]
    assert [r["shard"] for r in ranks] == [4, 3] and len(ranks[0]["ref"]) >= 1
    assert ranks[0]["ref"] == ranks[1]["ref"] and ranks[0]["measure"] == ranks[1]["measure"]
    assert ranks[0]["ref"] == pytest.approx(ranks[0]["alone"], abs=1e-6)
    assert ranks[0]["measure"]["refusal_head_mass"] == pytest.approx(sum(ranks[0]["alone"]) / len(ranks[0]["alone"]), abs=1e-6)
