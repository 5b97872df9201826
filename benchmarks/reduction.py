"""Check and time every implementation of the hot-path reduction in one call.

For each shape, every variant (plain torch, torch.compile-fused) is checked against a float64
reference, then timed with CUDA events (GPU) or perf_counter (CPU), median of ``--iters``. The
achieved bandwidth (bytes of the activation read once, plus the mask) is reported as a fraction
of the measured device-to-device copy bandwidth of a buffer of the same size.

    python -m benchmarks.reduction                 # CPU here; on a GPU machine it uses cuda, bf16
    python -m benchmarks.reduction --dtype float32 --shapes 8x512x1536 4x2048x8960
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rimguard.hooks.reduce import get_reducer


def reference(x, mask, index):
    xd = x.double()[..., index]
    xd = xd.masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)
    keep = mask.bool().any(1, keepdim=True)
    return torch.where(keep, xd, torch.zeros_like(xd)).sum(0)


def timeit(fn, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4x256x1536", "8x512x1536", "8x1024x4096"])
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tracked", type=float, default=1.0, help="fraction of neurons tracked (index)")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    variants = {"plain": get_reducer(device, fused=False), "fused": get_reducer(device, fused=True)}
    print(f"device: {name}; dtype: {dtype}; tracked fraction: {a.tracked}")
    print(f"{'shape':<16}{'variant':<8}{'max err':>10}{'ms':>9}{'GB/s':>8}{'copy GB/s':>10}{'of copy':>9}")
    for shape in a.shapes:
        b, t, i = map(int, shape.split("x"))
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(b, t, i, device=device, generator=gen).to(dtype)
        mask = torch.ones(b, t, dtype=torch.long, device=device)
        mask[: b // 2, t // 2 :] = 0  # half the sequences padded to half length
        index = torch.randperm(i, device=device, generator=gen)[: max(1, int(a.tracked * i))].sort().values
        ref = reference(x, mask, index)
        nbytes = x.numel() * x.element_size() + mask.numel() * mask.element_size()
        dst = torch.empty_like(x)
        copy_s = timeit(lambda: dst.copy_(x), a.iters, device)
        copy_bw = 2 * x.numel() * x.element_size() / copy_s / 1e9  # read + write
        for vname, fn in variants.items():
            sums, _ = fn(x, mask, index)
            err = (sums.double() - ref).abs().max().item()
            tol = 1e-3 * ref.abs().max().item() + 1e-3
            if err > tol:
                raise SystemExit(f"{vname} disagrees with the float64 reference on {shape}: max error {err:.3g} > {tol:.3g}")
            sec = timeit(lambda: fn(x, mask, index), a.iters, device)
            bw = nbytes / sec / 1e9
            print(f"{shape:<16}{vname:<8}{err:>10.2e}{sec * 1e3:>9.3f}{bw:>8.1f}{copy_bw:>10.1f}{bw / copy_bw:>9.0%}")


if __name__ == "__main__":
    main()
