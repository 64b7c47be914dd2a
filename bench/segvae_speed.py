"""Segment VAE speed at D=64: training images/s and the residue renderer's FLOP/s vs this machine's matmul peak.

    .venv/bin/python bench/segvae_speed.py [--batch 64] [--steps 10] [--threads 2]

The renderer's FLOPs are counted as the batched matmul (2·B·N·D² for B images of N Gaussians) plus the
pixel-factor work (≈ 10 flops per erf-edge element, 2·B·N·(D+1) elements); the peak is a float32
(2048 × 2048) matmul timed in the same run. Numbers depend on the machine's load: run on an idle machine.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.models.components.atoms import project_residues
from cryobench_lab.models.segment_vae import SegmentVAE
from cryobench_lab.physics.rotations import random_rotations

ADK = Path(__file__).resolve().parents[1] / "src" / "cryobench_lab" / "structures" / "adk" / "adk_closed.pdb.gz"


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    D, apix, B = 64, 1.39, args.batch
    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / _best(lambda: a @ a, 5)
    info = DatasetInfo(n_particles=B, box_size=D, apix=apix, has_poses=True, structure=str(ADK))
    model = SegmentVAE(info)
    n = model.coords0.shape[0]
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(B, D, D, generator=g), "rot": random_rotations(B, generator=g),
             "trans": torch.zeros(B, 2), "ctf": torch.tensor([D, apix, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, 0.0]).expand(B, 9)}
    coords = model.coords0.expand(B, n, 3)
    render = _best(lambda: project_residues(coords, 2.0, model.amplitudes, batch["rot"], D, apix), args.steps)
    flops = 2 * B * n * D * D + 10 * 2 * B * n * (D + 1)
    opt = model.configure_optimizers()

    def step():
        loss = model.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    train = float(np.median([_best(step, 1) for _ in range(args.steps)]))
    print(json.dumps({
        "threads": args.threads, "batch": B, "D": D, "n_residues": n,
        "matmul_peak_gflops": peak / 1e9, "render_forward_s": render, "render_gflops": flops / render / 1e9,
        "render_fraction_of_peak": flops / render / peak, "train_step_s": train, "train_images_per_s": B / train,
    }, indent=1))


if __name__ == "__main__":
    main()
