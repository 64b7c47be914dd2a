"""Sweep bookkeeping: deterministic run folders, skipping finished runs, failures that do not stop a sweep.

A study is one config in ``conf/sweep/`` (``python -m cryobench_lab -m +sweep=<study>``). Its sweep folder
is ``${sweep_root}/<study>`` and each job's folder is named by its own overrides (Hydra's
``override_dirname``, e.g. ``data.snr=0.1,model=segvae,seed=0``), so re-running the same command maps every
job to the same folder. A job whose folder holds a *complete* run is skipped:

- complete = ``complete.json``, written last (run_folder.py), carries the ``config_hash`` of the job's current
  config and lists every output, each still there with its size; and ``metrics.json`` parses and carries
  ``train/wall_time_s`` and the same ``config_hash``;
- ``config_hash`` is a SHA-1 of the resolved config without the keys in :data:`EXECUTION_KEYS` (where the run
  writes, how many threads, progress bars, loggers): changing a method's or dataset's parameter re-runs the
  job, changing how it is executed does not.

A killed sweep therefore keeps every finished run and re-running the same command finishes the rest (a job
killed while writing its outputs has no ``complete.json`` and continues from its checkpoint). A job that fails with an :class:`~cryobench_lab.errors.InputError` (a method that
cannot run on a dataset, say) writes ``error.txt`` into its folder and the sweep goes on; ``compare`` lists it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cryobench_lab.callbacks import distributed  # noqa: F401  registers strategy ddp_cryobench (conf/trainer/ddp.yaml)
from cryobench_lab.io.atomic import write_text_atomic
from cryobench_lab.run_folder import marked_complete, move_run_aside

#: config keys that change how a run executes but not what it computes (dotted paths)
EXECUTION_KEYS = (
    "output_dir", "skip_finished", "threads", "logger", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "data.num_workers", "data.cache_dir", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.accelerator", "metrics.figures", "metrics.save_volumes", "resume",
)


def config_hash(cfg: DictConfig) -> str:
    """SHA-1 (12 hex digits) of the resolved config without :data:`EXECUTION_KEYS`."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in EXECUTION_KEYS:
        *parents, leaf = key.split(".")
        node = container
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def finished_metrics(out_dir: Path, cfg: DictConfig) -> dict | None:
    """The run's metrics when ``out_dir`` holds a complete run of this config (see the module doc), else None."""
    out_dir = Path(out_dir)
    current = config_hash(cfg)
    if not marked_complete(out_dir, current):
        return None
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if "train/wall_time_s" in metrics and metrics.get("config_hash") == current else None


def set_aside_stale_run(out_dir: Path, cfg: DictConfig) -> Path | None:
    """When ``out_dir`` holds a run of *another* config (the study's file changed since), move that whole run
    aside (``replaced-<time>/``, run_folder.py) so that the job starts over instead of resuming or mixing with
    it; returns where it went, or None."""
    stored = Path(out_dir) / "config.yaml"
    if stored.is_file() and config_hash(OmegaConf.load(stored)) != config_hash(cfg):
        return move_run_aside(Path(out_dir))
    return None


def in_multirun() -> bool:
    """True inside a Hydra multirun job (a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def record_failure(out_dir: Path, message: str) -> None:
    """Keep a sweep going after a job's input error: one line on stderr and in ``out_dir/error.txt``."""
    write_text_atomic(Path(out_dir) / "error.txt", message + "\n")
    print(f"error: {' '.join(message.split())} (sweep continues; recorded in {out_dir}/error.txt)", file=sys.stderr)


_CONFIG_FLAGS = {"--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"}
# what Lightning's DDP launcher writes into this process's environment (LOCAL_RANK there would make the next
# job of the sweep believe its ranks are started externally); restored before every job
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_ENV_AT_START = {k: os.environ.get(k) for k in _LAUNCH_ENV}


def prepare_ddp_relaunch(out_dir: Path) -> None:
    """Make Lightning's DDP child processes re-run *this job* of a sweep, not the whole sweep.

    Lightning starts ranks 1..N-1 of a local DDP run by re-running ``sys.argv`` with
    ``hydra.run.dir=<HydraConfig run.dir>``. In a multirun that command line would start the whole sweep
    again; here it becomes this job's overrides, run (not multirun) in this job's folder. No-op outside a
    multirun and on a cluster, where SLURM starts every rank itself.
    """
    if not in_multirun():
        return
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():  # the previous job's DDP group
        torch.distributed.destroy_process_group()
    for key, value in _ENV_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    flags, args = [], iter(sys.argv[1:])
    for a in args:  # keep --config-dir/--config-name (their value may be the next argument)
        if a.split("=")[0] in _CONFIG_FLAGS:
            flags += [a] if "=" in a else [a, next(args, "")]
    quoted = str(out_dir).replace("\\", "\\\\").replace("'", "\\'")  # job folders hold '=' and ','
    sys.argv = [sys.argv[0], *flags, *hc.overrides.task, f"output_dir='{quoted}'"]
    with open_dict_unlocked(hc):
        hc.run.dir = str(out_dir)


class open_dict_unlocked:
    """Temporarily writable (unlocked, not read-only, open) OmegaConf node."""

    def __init__(self, node):
        self.node = node

    def __enter__(self):
        self.flags = (self.node._get_flag("readonly"), self.node._get_flag("struct"))
        OmegaConf.set_readonly(self.node, False)
        OmegaConf.set_struct(self.node, False)
        return self.node

    def __exit__(self, *exc):
        OmegaConf.set_readonly(self.node, self.flags[0])
        OmegaConf.set_struct(self.node, self.flags[1])
        return False
