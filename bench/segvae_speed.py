"""Segment VAE speed at D=64: training images/s and the residue renderer's FLOP/s vs this machine's matmul peak.

    .venv/bin/python bench/segvae_speed.py [--batch 64] [--steps 20] [--rounds 10] [--threads 1] [--out bench/results/segvae_speed.json]

The renderer's FLOPs are its batched matmul, 2·B·N·D² for B images of N Gaussians: the forward reads
each Gaussian's pixel factors from a precomputed profile table (``atoms.profile_table``), so the matmul
is all its arithmetic. The peak is a float32 (2048 × 2048) matmul timed in the same run, with the
same number of threads. The peak and the renderer are timed in alternating rounds and each keeps its best
call over all rounds (the usual minimum of a micro-benchmark), so a burst of load on a shared host slows
both or neither. With ``--threads 1`` every time is the thread's CPU time (``time.thread_time``),
so the load of a shared machine does not enter the fraction; with more threads it is wall time (then
run on an idle machine). The load average is recorded next to the numbers.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.models.components.atoms import project_residues
from cryobench_lab.models.segment_vae import SegmentVAE
from cryobench_lab.physics.rotations import random_rotations

ADK = Path(__file__).resolve().parents[1] / "src" / "cryobench_lab" / "structures" / "adk" / "adk_closed.pdb.gz"


def _best(fn, repeats: int, clock) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="calls per round")
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds of peak and renderer timings")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    D, apix, B = 64, 1.39, args.batch
    a = torch.randn(2048, 2048)
    info = DatasetInfo(n_particles=B, box_size=D, apix=apix, has_poses=True, structure=str(ADK))
    # the CPU default's restraints (conf/model/segvae.yaml): the clash term is part of every training step
    model = SegmentVAE(info, continuity_weight=0.001, clash_weight=100.0)
    n = model.coords0.shape[0]
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(B, D, D, generator=g), "rot": random_rotations(B, generator=g),
             "trans": torch.zeros(B, 2), "ctf": torch.tensor([D, apix, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, 0.0]).expand(B, 9)}
    coords = (model.coords0 + model.offset).expand(B, n, 3).clone().requires_grad_()
    grad = torch.randn(B, D, D, generator=g)

    def forward():
        with torch.no_grad():
            project_residues(coords, 2.0, model.amplitudes, batch["rot"], D, apix)

    def forward_backward():
        (project_residues(coords, 2.0, model.amplitudes, batch["rot"], D, apix) * grad).sum().backward()

    matmul, render, render_fb = [], [], []
    for _ in range(args.rounds):
        matmul.append(_best(lambda: a @ a, 3, clock))
        render.append(_best(forward, args.steps, clock))
        render_fb.append(_best(forward_backward, args.steps, clock))
    peak = 2 * 2048**3 / min(matmul)
    flops = 2 * B * n * D * D
    opt = model.configure_optimizers()

    def step():
        loss = model.losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    train = float(np.median([_best(step, 1, clock) for _ in range(args.steps)]))
    result = {
        "threads": args.threads, "clock": clock.__name__, "batch": B, "D": D, "n_residues": n,
        "load_average_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "matmul_peak_gflops": peak / 1e9,
        "render_forward_s": min(render), "render_gflops": flops / min(render) / 1e9,
        "render_fraction_of_peak": flops / min(render) / peak,
        # the same ratio within each round (its own peak and renderer time): the spread of the noise
        "render_fraction_of_peak_per_round": [round(flops * m / (r * 2 * 2048**3), 3) for m, r in zip(matmul, render)],
        "render_forward_backward_s": min(render_fb),
        "train_step_s": train, "train_images_per_s": B / train,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
