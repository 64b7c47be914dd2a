"""One run per folder, and what a run folder must hold before it counts as done or can be resumed.

- **Lock** (:func:`run_lock`): an OS-level lock (``flock``) on ``<run>/.lock`` for the whole run; the file names
  its holder (host, pid, start time). The kernel drops the lock when the holder dies, so a killed run never
  leaves a stale lock behind; a second run into a held folder is refused with one line naming the holder.
  (``flock`` on a network filesystem may lock only per host.)
- **Completeness marker** (:func:`write_marker`): ``complete.json`` is written last, after every output
  (``metrics.json``, volumes, figures, the method's ``classes/`` ...), and lists them with their sizes; a
  sweep's ``skip_finished`` trusts a folder only when the marker matches the job's config and every listed
  file is still there with that size (:func:`marked_complete`).
- **Moving a run aside** (:func:`move_run_aside`): starting over in a used folder moves everything the
  previous run wrote into ``<run>/replaced-<time>/`` (Hydra's own records of the current run stay).
- **Checkpoint choice** (:func:`newest_intact_checkpoint`): ``last.ckpt``, else the newest epoch checkpoint
  that loads; unreadable ones are reported, never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import write_json_atomic

LOCK = ".lock"
MARKER = "complete.json"
ASIDE_PREFIX = "replaced-"
# entries of a run folder that belong to the process running in it, not to a previous run's results
_OWN = {LOCK, ".hydra"}
# not outputs: the lock, Hydra's records, W&B's own files (``wandb sync`` adds to them), checkpoints (a user
# may delete them to save space without making the results incomplete), runs moved aside
_UNLISTED_TOP = (LOCK, ".hydra", "wandb", "checkpoints", MARKER, ASIDE_PREFIX)


def first_process() -> bool:
    """False in the other processes of a distributed run (Lightning's DDP children, SLURM ranks), which run
    the entry point again inside the first process's folder: only the first one locks the folder, moves a
    previous run aside and records provenance."""
    return all(int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _busy(out_dir: Path, fd: int) -> InputError:
    holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
    return InputError(f"run folder {out_dir} is in use by {holder}; wait for that run to end or choose another "
                      "hydra.run.dir")


def check_not_busy(out_dir: Path) -> None:
    """InputError when a run holds ``out_dir`` now; lets the entry point refuse before Hydra writes its
    records (``.hydra/``) into the holder's folder. :func:`run_lock` still decides a race."""
    try:
        fd = os.open(out_dir / LOCK, os.O_RDONLY)
    except OSError:  # no lock file: no run has held this folder
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(out_dir, fd) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.lock`` for the duration of the block; InputError when another process holds it."""
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        err = _busy(out_dir, fd)
        os.close(fd)
        raise err from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race with a process opening it)


def move_run_aside(out_dir: Path) -> Path | None:
    """Move everything a previous run left in ``out_dir`` into ``out_dir/replaced-<time>/``; returns it or None.

    Kept in place: this process's lock and Hydra records (``.hydra``, ``*.log``) and earlier moved-aside runs.
    """
    old = [p for p in out_dir.iterdir() if p.name not in _OWN and not p.name.endswith(".log")
           and not p.name.startswith(ASIDE_PREFIX)] if out_dir.is_dir() else []
    if not old:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out_dir / f"{ASIDE_PREFIX}{stamp}"
    n = 1
    while aside.exists():
        aside, n = out_dir / f"{ASIDE_PREFIX}{stamp}-{n}", n + 1
    aside.mkdir()
    for p in old:
        p.rename(aside / p.name)
    return aside


def _outputs(out_dir: Path) -> dict[str, int]:
    files = {}
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir).as_posix()
        temporary = p.name.endswith(".log") or (p.name.startswith(".") and ".tmp" in p.name)  # io/atomic.py
        if p.is_file() and not rel.startswith(_UNLISTED_TOP) and not temporary:
            files[rel] = p.stat().st_size
    return files


def write_marker(out_dir: Path, config_hash: str) -> None:
    """Write ``complete.json`` (call it last): the config hash and every output file with its size (bytes)."""
    write_json_atomic(out_dir / MARKER, {"config_hash": config_hash, "files": _outputs(out_dir),
                                         "written": time.strftime("%Y-%m-%d %H:%M:%S")})


def clear_marker(out_dir: Path) -> None:
    """A run that is about to rewrite outputs first stops the folder from counting as complete."""
    (out_dir / MARKER).unlink(missing_ok=True)


def marked_complete(out_dir: Path, config_hash: str) -> bool:
    """True when ``complete.json`` carries ``config_hash`` and every file it lists exists with its size."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
        files = dict(marker["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if marker.get("config_hash") != config_hash:
        return False
    for rel, size in files.items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _epoch_step(path: Path) -> tuple[int, int]:
    m = re.search(r"epoch=(\d+)-step=(\d+)", path.name)
    return (int(m[1]), int(m[2])) if m else (-1, -1)


def load_checkpoint(path: Path) -> dict:
    """The whole checkpoint (every tensor read, so a truncated file fails here, not inside Lightning), loaded
    as Lightning loads it (``weights_only``: tensors and plain containers only, no code)."""
    import torch  # here: the entry point's start-up checks import this module and should stay quick

    return torch.load(path, map_location="cpu", weights_only=True)


def newest_intact_checkpoint(ckpt_dir: Path) -> tuple[Path | None, dict | None, list[str]]:
    """(path, loaded checkpoint, problems): ``last.ckpt`` if it loads, else the newest loadable epoch checkpoint.

    ``problems`` holds one short note per unreadable candidate, newest first. (None, None, []) when the folder
    holds no checkpoint at all.
    """
    epochs = sorted((p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"), key=_epoch_step, reverse=True)
    candidates = ([ckpt_dir / "last.ckpt"] if (ckpt_dir / "last.ckpt").is_file() else []) + epochs
    problems = []
    for path in candidates:
        try:
            return path, load_checkpoint(path), problems
        except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError ... for a broken file
            reason = " ".join(str(err).split()).split(". ")[0][:160] or type(err).__name__  # its first sentence
            problems.append(f"{path.name} is unreadable ({reason})")
    return None, None, problems
