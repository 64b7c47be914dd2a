"""What a run folder records so that a result can be traced and re-checked: ``provenance.json``.

- ``versions``: the package version and git commit (``dirty`` when the checkout has uncommitted changes),
  Python, torch, lightning, wandb and numpy; ``hardware``: CPU model, usable cores, torch's thread settings
  and the environment variables behind them (a wall time means little without them);
- ``dataset``: the dataset fingerprint, a SHA-256 over the particle metadata files (star/cs/txt, pose and
  CTF pickles: their bytes) and the particle stacks (name, size in bytes, image count, box); hashing the
  stacks' sizes instead of their pixels keeps it fast on terabyte datasets while still catching a stack
  that was swapped for another extraction;
- ``ground_truth``: the number of states and a SHA-256 over the labels and the ground-truth volumes as the
  run uses them (after cropping to the training box);
- ``ground_truth_pairing`` (provenance.json only): the volume file each state was scored against.

The same fingerprints go into every checkpoint (``callbacks/reliability.py``); ``python -m
cryobench_lab.eval`` refuses to score a checkpoint against data whose fingerprints differ unless
``force=true``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.io.stacks import STACK_SUFFIXES

REPO = Path(__file__).resolve().parents[2]
_CHUNK = 1 << 20  # bytes hashed at a time


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment() -> dict:
    """Package version, git commit and the versions of the libraries a result depends on."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "cryobench_lab": _version("cryobench_lab"),
        "git_commit": commit,
        "git_dirty": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "lightning": _version("lightning"),
        "wandb": _version("wandb"),
        "numpy": _version("numpy"),
        "machine": f"{platform.system()} {platform.machine()}",
        "hardware": hardware(),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware() -> dict:
    """What a wall time depends on: CPU model, cores this process may use, torch's thread settings and the
    environment variables that set them, the BLAS/oneDNN build, and the GPU if one is used."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    env = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "MALLOC_ARENA_MAX",
           "LD_PRELOAD", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores_available": cores,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "env": {k: os.environ[k] for k in env if k in os.environ},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)


def dataset_fingerprint(datamodule) -> str:
    """SHA-256 (hex) of a set-up :class:`ParticleDataModule`'s metadata files and stack sizes."""
    h = hashlib.sha256()
    files = {"particles": datamodule.info.source, "poses": datamodule.cfg.poses, "ctf": datamodule.cfg.ctf}
    for key in ("particles", "poses", "ctf"):
        path = files.get(key)
        h.update(f"\n{key}:".encode())
        if key == "ctf" and path == "none":  # data.ctf=none: the file's CTF is not used
            h.update(b"none")
        elif path and Path(path).suffix.lower() not in STACK_SUFFIXES:
            _hash_file(h, Path(path))
    images = datamodule.dataset.meta.images
    for f in images.files:
        stack = Path(f)
        h.update(f"\nstack:{stack.name}:{stack.stat().st_size}".encode())
    h.update(f"\nn={images.n} D={images.D}".encode())
    return h.hexdigest()


def ground_truth_fingerprint(info) -> dict:
    """``{"n_states": S, "sha256": hex or None}`` of the labels and ground-truth volumes of a DatasetInfo."""
    if info.labels is None and info.gt_volumes is None:
        return {"n_states": 0, "sha256": None}
    h = hashlib.sha256()
    if info.labels is not None:
        h.update(np.ascontiguousarray(info.labels, dtype=np.int64).tobytes())
    gt = info.gt_volumes
    if isinstance(gt, torch.Tensor):
        h.update(gt.float().contiguous().numpy().tobytes())
    elif gt is not None:  # volumes left on disk (too many for memory): their names and sizes
        for f in map(Path, gt.files):
            h.update(f"\n{f.name}:{f.stat().st_size}".encode())
    return {"n_states": info.n_states, "sha256": h.hexdigest()}


def ground_truth_pairing(info) -> dict | None:
    """``{"folder": ..., "volumes": {"<state>": "<file relative to folder>"}}`` of a DatasetInfo, or None
    without ground-truth volumes."""
    if not info.gt_volume_files:
        return None
    folder = Path(info.gt_volume_files[0]).parent
    names = {}
    for state, f in enumerate(map(Path, info.gt_volume_files)):
        names[str(state)] = str(f.relative_to(folder)) if f.parent == folder else str(f)
    return {"folder": str(folder), "volumes": names}


def fingerprints(datamodule) -> dict:
    """``{"dataset": ..., "ground_truth": {...}}`` of a set-up DataModule."""
    return {"dataset": dataset_fingerprint(datamodule), "ground_truth": ground_truth_fingerprint(datamodule.info)}
