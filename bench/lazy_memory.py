"""Peak memory of a run on a particle stack larger than the configured memory cap (lazy mode).

Writes a synthetic stack of N×D×D float32 (default 40,000 × 96², 1.47 GB) with poses and CTF pickles,
then runs `python -m cryobench_lab model=backproject data=custom ... data.memory_cap_gb=0.25` in a child
process and reports its peak resident memory next to the stack size. Re-run:

    .venv/bin/python bench/lazy_memory.py [--n 40000] [--box 96] [--cap-gb 0.25] [--work /tmp/lazy_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np

from cryobench_lab.io.pickles import save_ctf, save_poses
from cryobench_lab.physics.rotations import random_rotations


def write_stack(path: Path, n: int, D: int, chunk: int = 2000) -> None:
    rng = np.random.default_rng(0)
    with mrcfile.new_mmap(path, shape=(n, D, D), mrc_mode=2, overwrite=True) as m:
        m.voxel_size = 2.0
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            m.data[s:e] = rng.standard_normal((e - s, D, D), dtype=np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--cap-gb", type=float, default=0.25)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lazy_bench"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    stack = args.work / "particles.mrcs"
    if not stack.exists() or stack.stat().st_size < args.n * args.box**2 * 4:
        print(f"writing {stack} ...", flush=True)
        write_stack(stack, args.n, args.box)
    import torch

    save_poses(args.work / "poses.pkl", random_rotations(args.n, generator=torch.Generator().manual_seed(0)).numpy(),
               np.zeros((args.n, 2), np.float32), args.box)
    ctf = np.zeros((args.n, 9), np.float32)
    ctf[:] = [args.box, 2.0, 15000, 14500, 30, 300, 2.7, 0.1, 0]
    save_ctf(args.work / "ctf.pkl", ctf)
    out = args.work / "run"
    cmd = [
        sys.executable, "-c",
        "import resource, runpy, sys; sys.argv=['cryobench_lab']+sys.argv[1:];"
        "\ntry:\n  runpy.run_module('cryobench_lab', run_name='__main__')\nfinally:\n"
        "  print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)",
        "model=backproject", "model.pad=1", "data=custom", f"data.particles={stack}",
        f"data.poses={args.work / 'poses.pkl'}", f"data.ctf={args.work / 'ctf.pkl'}",
        f"data.memory_cap_gb={args.cap_gb}", "data.batch_size=256", "logger=none",
        "trainer.enable_progress_bar=false", f"hydra.run.dir={out}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    peak_kb = int(proc.stderr.split("PEAK_RSS_KB")[-1].split()[0])
    result = {
        "stack_gb": stack.stat().st_size / 2**30,
        "memory_cap_gb": args.cap_gb,
        "peak_rss_gb": peak_kb / 2**20,
        "wall_s": wall,
        "images": args.n,
        "box": args.box,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
