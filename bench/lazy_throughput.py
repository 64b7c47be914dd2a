"""Training-loader images/s on a stack larger than the memory cap: in memory vs lazy (random order) vs lazy
with the chunked shuffler (data.shuffle=chunked), with a cold page cache (the stack's pages are evicted
before each lazy measurement, as when the stack is larger than RAM) and a warm one.

Writes a synthetic N×D×D float32 stack (default 16,000 × 96², 590 MB) with poses and CTF pickles, then
iterates the ParticleDataModule's training loader (the batches a method trains on: windowed, Fourier-cropped,
normalised) for --images images per mode. Re-run:

    .venv/bin/python bench/lazy_throughput.py [--n 16000] [--box 96] [--train-box 64] [--cap-gb 0.25]
        [--images 4096] [--work /tmp/lazy_throughput] [--out bench/results/lazy_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch
from omegaconf import OmegaConf

from cryobench_lab.config import DataConfig
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.io.pickles import save_ctf, save_poses
from cryobench_lab.physics.rotations import random_rotations


def write_inputs(work: Path, n: int, D: int) -> Path:
    stack = work / "particles.mrcs"
    if not stack.exists() or stack.stat().st_size < n * D * D * 4:
        rng = np.random.default_rng(0)
        with mrcfile.new_mmap(stack, shape=(n, D, D), mrc_mode=2, overwrite=True) as m:
            m.voxel_size = 2.0
            for s in range(0, n, 2000):
                e = min(s + 2000, n)
                m.data[s:e] = rng.standard_normal((e - s, D, D), dtype=np.float32)
    rot = random_rotations(n, generator=torch.Generator().manual_seed(0)).numpy()
    save_poses(work / "poses.pkl", rot, np.zeros((n, 2), np.float32), D)
    ctf = np.zeros((n, 9), np.float32)
    ctf[:] = [D, 2.0, 15000, 14500, 30, 300, 2.7, 0.1, 0]
    save_ctf(work / "ctf.pkl", ctf)
    return stack


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (the next reads come from disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(work: Path, stack: Path, args, lazy: bool, shuffle: str, cold: bool) -> dict:
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {
        "name": "bench", "particles": str(stack), "poses": str(work / "poses.pkl"), "ctf": str(work / "ctf.pkl"),
        "box_size": args.train_box, "lazy": lazy, "memory_cap_gb": args.cap_gb, "shuffle": shuffle,
        "chunk_size": args.chunk_size, "shuffle_window": args.window, "batch_size": 64, "val_fraction": 0.0,
    })
    t0 = time.perf_counter()
    dm = ParticleDataModule(cfg, seed=0)
    dm.setup()
    setup_s = time.perf_counter() - t0
    if cold:
        evict(stack)
    seen, t0 = 0, time.perf_counter()
    for batch in dm.train_dataloader():
        seen += len(batch["index"])
        if seen >= args.images:
            break
    dt = time.perf_counter() - t0
    return {"mode": ("lazy" if lazy else "in-memory") + (f", {shuffle}" if lazy else ""),
            "page_cache": "cold" if cold else "warm", "images": seen, "seconds": dt, "images_per_s": seen / dt,
            "setup_s": setup_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16_000)
    ap.add_argument("--box", type=int, default=96)
    ap.add_argument("--train-box", type=int, default=64)
    ap.add_argument("--cap-gb", type=float, default=0.25)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lazy_throughput"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lazy_throughput.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    stack = write_inputs(args.work, args.n, args.box)
    rows = []
    for lazy, shuffle, cold in ((True, "random", True), (True, "chunked", True), (True, "random", False),
                                (True, "chunked", False), (False, "random", False)):
        rows.append(measure(args.work, stack, args, lazy, shuffle, cold))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
        "load_average_at_end": list(os.getloadavg()), "torch_threads": torch.get_num_threads(),
        "stack": {"n": args.n, "box": args.box, "bytes": stack.stat().st_size, "memory_cap_gb": args.cap_gb},
        "train_box": args.train_box, "chunk_size": args.chunk_size, "shuffle_window": args.window, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
