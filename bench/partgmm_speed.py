"""Part-aware Gaussian mixture speed at D=64: stage-2 training images/s and the renderer's FLOP/s vs this
machine's measured matmul peak.

    .venv/bin/python bench/partgmm_speed.py [--gaussians 8192] [--batch 64] [--steps 5] [--threads 2]

A synthetic stage-2 model (``--gaussians`` Gaussians in 16 anchors, the CPU-default MLP sizes unless
``--paper``) on random images with random poses and CTF. The renderer's FLOPs are counted as in
bench/segvae_speed.py: the batched matmul (2·B·N·D²) plus ≈ 10 flops per evaluated erf edge element,
here only on each Gaussian's ±5σ window (2·B·N·(W + 1), W the window width in px). The peak is a float32
(2048 × 2048) matmul timed in the same run. Numbers depend on the machine's load: record ``uptime``.
"""

import argparse
import json
import math
import time

import numpy as np
import torch

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.models.components.gaussian_render import render_gaussians, window_pixels
from cryobench_lab.models.partgmm import PartGMM
from cryobench_lab.physics.rotations import random_rotations


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gaussians", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paper", action="store_true", help="paper MLP sizes (3 x 128) instead of the CPU default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    D, apix, B, N = 64, 2.61, args.batch, args.gaussians
    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / _best(lambda: a @ a, 5)
    info = DatasetInfo(n_particles=B, box_size=D, apix=apix, has_poses=True)
    sizes = {"hidden_dim": 128, "n_layers": 3} if args.paper else {}
    model = PartGMM(info, n_coarse=16, n_fine=N, n_anchors=16, **sizes)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a compact particle of radius ~60 Å, σ from the seeding rule
        model.fine.centers.copy_(torch.randn(N, 3, generator=g) * 20.0)
        spacing = ((4 / 3) * math.pi * 60.0**3 / N) ** (1 / 3)
        model.fine.log_sigma.fill_(math.log(max(0.5 * spacing, 0.5 * apix)))
        model.fine.log_amp.fill_(0.0)
        model.fine_anchor.copy_(torch.randint(16, (N,), generator=g))
        model.stage_done.fill_(1)
    batch = {"images": torch.randn(B, D, D, generator=g), "rot": random_rotations(B, generator=g),
             "trans": torch.zeros(B, 2), "index": torch.arange(B),
             "ctf": torch.tensor([D, apix, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, 0.0]).expand(B, 9)}
    centers = model.fine.centers.detach().expand(B, N, 3)
    sigma, amp = model.fine.sigma.detach(), torch.ones(B, N)
    render = _best(lambda: render_gaussians(centers, sigma, amp, batch["rot"], D, apix), args.steps)
    W = window_pixels(float(sigma.max()), D, apix)
    flops = 2 * B * N * D * D + 10 * 2 * B * N * (W + 1)
    model.step(batch, 2)
    train = float(np.median([_best(lambda: model.step(batch, 2), 1) for _ in range(args.steps)]))
    print(json.dumps({
        "threads": args.threads, "batch": B, "D": D, "n_gaussians": N, "window_px": W,
        "mlp": "3x128" if args.paper else "2x64",
        "matmul_peak_gflops": peak / 1e9, "render_forward_s": render, "render_gflops": flops / render / 1e9,
        "render_fraction_of_peak": flops / render / peak, "train_step_s": train, "train_images_per_s": B / train,
    }, indent=1))


if __name__ == "__main__":
    main()
