"""Performance properties that are not timings: fused == plain, no host sync, flat memory."""

import gc
import itertools

import pytest
import torch

from rimguard import RIMGuard
from rimguard.hooks.reduce import get_reducer, masked_max_sum
from rimguard.testing import tiny_model

from .test_actions import REASONING


def _reference(x, mask, index):
    xd = x.double()[..., index].masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)
    return torch.where(mask.bool().any(1, keepdim=True), xd, torch.zeros_like(xd)).sum(0)


def test_fused_reduction_matches_float64_reference_on_cpu():
    fused = get_reducer(torch.device("cpu"), fused=True)
    gen = torch.Generator().manual_seed(0)
    for b, t, i in [(2, 3, 5), (3, 17, 64), (5, 40, 96)]:
        x = torch.randn(b, t, i, generator=gen)
        mask = (torch.rand(b, t, generator=gen) > 0.4).long()
        mask[0] = 0  # an empty sequence
        for index, m in itertools.product((torch.randperm(i, generator=gen)[: i // 3 + 1], torch.randperm(i, generator=gen)[: i // 16 + 1]),
                                          (mask, torch.ones_like(mask))):
            sums, count = fused(x, m, index)
            torch.testing.assert_close(sums.double(), _reference(x, m, index), rtol=1e-6, atol=1e-6)
            assert count.item() == m.bool().any(1).sum().item()
            plain = masked_max_sum(x, m, index)
            torch.testing.assert_close(sums, plain[0])


def _guarded_loop(model, tok, fast_config, atlas, mode, device):
    guard = RIMGuard(fast_config(mode=mode, probe_every=1000, log_file=None), atlas=atlas, task_prompts=REASONING)
    guard.engine.setup(model.to(device), tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 500, (2, 16), device=device)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0

    def step():
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        guard.engine.after_optimizer_step()
        guard.engine.monitor.step_end()

    return guard, step


@pytest.mark.parametrize("mode", ["monitor", "regularize", "freeze"])
def test_memory_flat_over_200_steps_and_bounded_by_layers_times_width(tok, fast_config, llama_atlas, mode):
    model = tiny_model("llama")
    guard, step = _guarded_loop(model, tok, fast_config, llama_atlas, mode, torch.device("cpu"))

    def live():
        gc.collect()
        tensors = [o for o in gc.get_objects() if torch.is_tensor(o)]
        return len(tensors), sum(t.numel() * t.element_size() for t in tensors)

    for _ in range(10):
        step()
    count0, bytes0 = live()
    for _ in range(200):
        step()
    count1, bytes1 = live()
    assert count1 == count0 and bytes1 == bytes0, (count0, count1, bytes0, bytes1)
    # everything the monitor keeps is O(layers x intermediate) (plus the fixed KL probe rows)
    mon = guard.engine.monitor
    kept = sum(getattr(mon, k).numel() for k in ("ref_safe", "ref_task", "ema_task"))
    assert kept <= 3 * 2 * 128
    guard.engine.teardown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["monitor", "regularize"])
def test_no_host_sync_inside_guarded_steps(tok, fast_config, llama_atlas, mode):
    model = tiny_model("llama")
    guard, step = _guarded_loop(model, tok, fast_config, llama_atlas, mode, torch.device("cuda"))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    guard.engine.teardown()
