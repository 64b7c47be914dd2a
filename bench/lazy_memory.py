"""Peak memory of a run on a particle stack larger than the configured memory cap (lazy mode).

Writes a synthetic stack of N×D×D float32 (default 40,000 × 96², 1.47 GB) with poses and CTF pickles,
then runs `python -m cryobench_lab model=backproject data=custom ... data.memory_cap_gb=0.25` in a child
process and reports its peak resident memory next to the stack size. Re-run:

    .venv/bin/python bench/lazy_memory.py [--n 40000] [--box 96] [--cap-gb 0.25] [--work /tmp/lazy_bench]

``--soak`` (issue 10): ≥ 100,000 small images spread over many stacks named by one STAR file, one epoch in
lazy mode with DataLoader worker processes. A monitor samples the whole process tree (the run and its
workers) every 0.2 s: summed resident memory (peak and its growth over the epoch) and open file
descriptors per process (peak, and at the end against the start: a leak grows them). Images/s is the
run's own ``train/images_per_s`` (particles per second of training, scoring excluded). Re-run:

    .venv/bin/python bench/lazy_memory.py --soak [--n 100000] [--box 32] [--stacks 200] [--workers 2]
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


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(c) for c in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def _mem_kb(pid: int, field: str) -> int:
    """``field`` of /proc/<pid>/smaps_rollup in kB: Rss, or Pss (shared pages split between their users, so
    the sum over a forked worker tree counts each page once)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def soak(args) -> dict:
    """One lazy epoch of model=backproject over ``args.n`` D=``args.box`` images in ``args.stacks`` stacks."""
    import torch

    from cryobench_lab.io.mrc import write_stack as write_mrcs
    from cryobench_lab.io.star import write_particle_star

    work = args.work
    star = work / "particles.star"
    per = -(-args.n // args.stacks)
    if not star.exists():
        print(f"writing {args.stacks} stacks of {per} images and {star} ...", flush=True)
        rng = np.random.default_rng(0)
        names = []
        for s in range(args.stacks):
            count = min(per, args.n - s * per)
            write_mrcs(work / f"stack_{s:04d}.mrcs", rng.standard_normal((count, args.box, args.box), dtype=np.float32), 2.0)
            names += [f"{i + 1}@stack_{s:04d}.mrcs" for i in range(count)]
        rot = random_rotations(args.n, generator=torch.Generator().manual_seed(0)).numpy()
        ctf = np.zeros((args.n, 9), np.float32)
        ctf[:] = [args.box, 2.0, 15000, 14500, 30, 300, 2.7, 0.1, 0]
        write_particle_star(star, names, rot, np.zeros((args.n, 2), np.float32), ctf, apix=2.0, D=args.box)
    out = work / "run"
    cmd = [
        sys.executable, "-m", "cryobench_lab", "model=backproject", "data=custom", f"data.particles={star}",
        "data.lazy=true", f"data.num_workers={args.workers}", f"data.batch_size={args.batch}", "data.val_fraction=0",
        "logger=csv", "metrics=fast", "metrics.save_volumes=false", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", f"hydra.run.dir={out}", "resume=false",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, WANDB_MODE="disabled"))
    samples = []  # (t, summed RSS kB, {pid: fds})
    lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        pids = [proc.pid, *_children(proc.pid)]
        samples.append((time.perf_counter() - t0, sum(_mem_kb(p, "Pss") for p in pids), {p: _fds(p) for p in pids},
                        _mem_kb(proc.pid, "Rss")))
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    if proc.returncode != 0:
        sys.exit("".join(lines)[-3000:])
    csv = (out / "csv" / "metrics.csv").read_text().splitlines() if (out / "csv" / "metrics.csv").exists() else []
    metrics = json.loads((out / "metrics.json").read_text())
    workers = [s for s in samples if len(s[2]) > 1]  # samples taken while the workers were alive

    def quarters(values: list) -> list:
        """Maxima over the four quarters of a time series: a leak makes them grow."""
        q = max(len(values) // 4, 1)
        return [max(values[i * q : (i + 1) * q] or [0]) for i in range(4)]

    run_fds = [s[2][proc.pid] for s in workers]
    worker_fds = [max(n for p, n in s[2].items() if p != proc.pid) for s in workers]
    return {
        "images": args.n,
        "box": args.box,
        "stacks": args.stacks,
        "stack_gb": args.n * args.box**2 * 4 / 2**30,
        "num_workers": args.workers,
        "batch_size": args.batch,
        "wall_s": wall,
        "train_wall_s": metrics["train/wall_time_s"],
        "images_per_s": metrics["train/images_per_s"],
        "peak_pss_tree_gb": max(s[1] for s in samples) / 2**20,
        "peak_rss_main_gb": max(s[3] for s in samples) / 2**20,
        "pss_tree_gb_by_quarter": [v / 2**20 for v in quarters([s[1] for s in workers])],
        "main_fds_by_quarter": quarters(run_fds),
        "worker_fds_by_quarter": quarters(worker_fds),
        "max_open_stacks_per_process": 64,
        "csv_rows": len(csv),
        "load_average_before": LOAD_BEFORE,
        "load_average_after": os.getloadavg(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, shared",
    }


LOAD_BEFORE = os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--box", type=int, default=None)
    ap.add_argument("--cap-gb", type=float, default=0.25)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--soak", action="store_true", help="many small images, many stacks, DataLoader workers")
    ap.add_argument("--stacks", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    if args.soak:
        args.n, args.box = args.n or 100_000, args.box or 32
        args.work = args.work or Path("/tmp/soak_bench")
        args.work.mkdir(parents=True, exist_ok=True)
        result = soak(args)
        print(json.dumps(result, indent=2))
        results = Path(__file__).resolve().parent / "results" / "soak_lazy.json"
        results.write_text(json.dumps(result, indent=2) + "\n")
        return
    args.n, args.box = args.n or 40_000, args.box or 96
    args.work = args.work or Path("/tmp/lazy_bench")
    args.work.mkdir(parents=True, exist_ok=True)
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
