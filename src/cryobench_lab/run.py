"""Build data, model, loggers and trainer from a composed config; train; score; write outputs."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from cryobench_lab.callbacks.distributed import SumBuffersAcrossRanks
from cryobench_lab.callbacks.evaluation import EvaluationCallback, ScoreOptions
from cryobench_lab.callbacks.reliability import NONFINITE_MODES, AtomicCheckpointIO, EpochCheckpoint, ReliabilityCallback
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path, write_json_atomic
from cryobench_lab.provenance import environment, fingerprints
from cryobench_lab.sweeps import (
    config_hash,
    finished_metrics,
    in_multirun,
    prepare_ddp_relaunch,
    record_failure,
)
from cryobench_lab.wandb_tools import finish_wandb


def _check_model_keys(model_cfg: DictConfig) -> None:
    """Fail before any work when the model config names a parameter its class does not take."""
    target = model_cfg.get("_target_")
    if not target:
        raise InputError("model: the config has no _target_; choose a method with model=<name>")
    try:
        cls = hydra.utils.get_class(target)
    except Exception:
        raise InputError(f"model._target_: cannot import {target!r}") from None
    params = inspect.signature(cls.__init__).parameters
    accepted = set(params) - {"self", "info"}
    unknown = sorted(set(model_cfg.keys()) - accepted - {"_target_"})
    if unknown:
        raise InputError(
            f"model.{unknown[0]} is not a parameter of {cls.__name__}; valid keys: {', '.join(sorted(accepted))}"
        )


def build_model(cfg: DictConfig, info):
    """Instantiate ``cfg.model`` for a dataset (its keys are checked first)."""
    _check_model_keys(cfg.model)
    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    target = kwargs.pop("_target_")
    cls = hydra.utils.get_class(target)
    poses = OmegaConf.to_container(cfg.poses, resolve=True) if cfg.get("poses") is not None else {"source": "given"}
    if "poses" in inspect.signature(cls.__init__).parameters:  # a method that renders volumes takes a pose source
        kwargs["poses"] = poses
    elif poses["source"] != "given":
        raise InputError(f"poses={poses['source']}: model={cfg.model.name} uses the data's poses only; use poses=given "
                         "or a method that estimates poses (hydra, drgnai, classify3d, cryodrgn)")
    try:
        return cls(info=info, **kwargs)
    except ValueError as err:  # a model that cannot run on these data says why
        raise InputError(f"model={cfg.model.name}: {err}") from None


def _check_writable(out_dir: Path) -> None:
    probe = out_dir / ".write_test"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise InputError(f"output folder {out_dir} is not writable ({err.strerror}); set hydra.run.dir=<writable path>") from None


def check_inputs_not_empty(data_cfg) -> None:
    """A 0-byte input (an interrupted copy) fails with its name before any reader guesses at it."""
    for key in ("particles", "poses", "ctf", "labels", "structure"):
        path = data_cfg.get(key)
        if path and Path(path).is_file() and Path(path).stat().st_size == 0:
            raise InputError(f"data.{key}: {path} is empty (0 bytes); re-copy or re-export it")


SPACE_MARGIN = 64 * 2**20  # bytes for logs, figures and metrics


def check_space(out_dir: Path, model, info) -> None:
    """Fail before training when the output folder's disk cannot hold the run's outputs (a rough bound).

    Checkpoints: the state dict plus two Adam moments per trainable parameter, three copies at once (last,
    the epoch checkpoint and the temporary file of an atomic write); volumes: one float32 map per state.
    """
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    volumes = max(info.n_states, 1) * info.box_size**3 * 4
    need = 3 * (state + 2 * trainable) + 2 * volumes + SPACE_MARGIN
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise InputError(f"output folder {out_dir} has {free / 2**30:.2f} GB free but the run needs about "
                         f"{need / 2**30:.2f} GB (checkpoints and volumes); free some space or set "
                         "hydra.run.dir=<folder on a larger disk>")


def _requested_gpus(devices, available: int) -> int:
    if isinstance(devices, str):
        if devices == "auto":
            return max(available, 1)
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        devices = int(devices)
    if isinstance(devices, int):
        return max(available, 1) if devices == -1 else devices
    return len(devices)  # a list of device ids


def check_devices(trainer_cfg) -> None:
    """Fail before any work when the trainer asks for more GPUs than torch can see."""
    if str(trainer_cfg.accelerator) not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count()
    devices = trainer_cfg.devices
    devices = list(devices) if OmegaConf.is_list(devices) else devices
    wanted = _requested_gpus(devices, available)
    if wanted > available:
        raise InputError(f"trainer.devices={devices} asks for {wanted} GPU(s) but this machine has {available}; "
                         f"use trainer=cpu{f' or trainer.devices<={available}' if available else ''}")


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _first_process() -> bool:
    """False in the other processes of a distributed run (Lightning's DDP children, SLURM ranks), which run
    this module again: only the first one moves checkpoints aside and records provenance."""
    return all(int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


# Keys that may change between a run and its resume: how data are served, and where the files are (moved
# files are checked by the dataset and ground-truth fingerprints of provenance.json instead).
RESUMABLE_CHANGES = {
    "data.num_workers", "data.lazy", "data.memory_cap_gb", "data.cache_dir", "data.datadir", "data.particles",
    "data.poses", "data.ctf", "data.labels", "data.gt_volumes", "data.root",
}


def resume_checkpoint(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint to continue from (``checkpoints/last.ckpt``) or None; see ``TrainConfig.resume``.

    A checkpoint of a run with other data, model or seed is refused; ``resume=false`` moves old checkpoints
    aside (``checkpoints.replaced-<time>``) rather than deleting them.
    """
    ckpt_dir = out_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if cfg.resume is False:
        if ckpt_dir.exists() and _first_process():
            ckpt_dir.rename(out_dir / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        return None
    if not last.is_file():
        if cfg.resume:
            raise InputError(f"resume=true but {last} does not exist; pass hydra.run.dir=<the folder of the run "
                             "to resume>")
        return None
    stored_path = out_dir / "config.yaml"
    if stored_path.is_file():
        stored = _flat(OmegaConf.to_container(OmegaConf.load(stored_path)))
        now = _flat(OmegaConf.to_container(cfg, resolve=True))
        for key in sorted(set(stored) | set(now)):
            compared = key.split(".")[0] in ("data", "model", "seed") and key not in RESUMABLE_CHANGES
            if compared and stored.get(key) != now.get(key):
                raise InputError(f"{out_dir} holds a run with {key}={stored.get(key)} (now {now.get(key)}); "
                                 "resume with the same data, model and seed, or pass resume=false to start over")
    return str(last)


def write_provenance(out_dir: Path, prints: dict, resumed_from: str | None) -> None:
    """``provenance.json``: versions and dataset fingerprints (provenance.py); a resume appends an entry and
    is refused when the data changed since the run started."""
    if not _first_process():
        return
    path = out_dir / "provenance.json"
    record = {"versions": environment(), **prints, "resumes": []}
    if resumed_from and path.is_file():
        record = json.loads(path.read_text())
        for key in ("dataset", "ground_truth"):
            if record.get(key) != prints[key]:
                raise InputError(f"{out_dir}: the {key.replace('_', ' ')} fingerprint differs from the one this "
                                 "run started with (provenance.json); resume on the same files or pass "
                                 "resume=false to start over")
        record.setdefault("resumes", []).append({"checkpoint": resumed_from, "versions": environment()})
    write_json_atomic(path, record)


def wandb_mode() -> str:
    """'online' only when the user chose it or is logged in; the run never asks for an account."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    loggers = []
    for backend in cfg.logger.backends:
        if backend == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
        elif backend == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            os.environ.setdefault("WANDB_SILENT", "true")
            loggers.append(WandbLogger(
                project=cfg.logger.project, group=cfg.logger.group, tags=list(cfg.logger.tags),
                save_dir=str(out_dir), mode=wandb_mode(),
                name=f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}",
                config=OmegaConf.to_container(cfg, resolve=True),
            ))
        else:
            raise InputError(f"logger.backends: {backend!r} is unknown; use wandb and/or csv (logger=wandb|csv|none)")
    return loggers


def _trainer_kwargs(cfg: DictConfig, default_epochs: int) -> dict:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    t["max_epochs"] = t["max_epochs"] or default_epochs
    if t["limit_train_batches"] is None:
        del t["limit_train_batches"]
    return t


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; returns the metrics written to ``metrics.json``."""
    out_dir = Path(cfg.output_dir)
    if cfg.skip_finished and (done := finished_metrics(out_dir, cfg)) is not None:
        print(f"[cryobench_lab] skipped: {out_dir}/metrics.json is complete for this config", file=sys.stderr)
        return done
    if cfg.threads:  # a sweep's parallel jobs share the cores (conf/hydra/launcher/joblib_local.yaml)
        import torch

        torch.set_num_threads(cfg.threads)
    created = not (out_dir / "metrics.json").exists()
    try:
        _check_model_keys(cfg.model)
        if cfg.on_nonfinite not in NONFINITE_MODES:
            raise InputError(f"on_nonfinite={cfg.on_nonfinite!r} is unknown; use stop or skip")
        check_devices(cfg.trainer)
        check_inputs_not_empty(cfg.data)
        _check_writable(out_dir)
        ckpt_path = resume_checkpoint(cfg, out_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = ParticleDataModule(cfg.data, seed=cfg.seed)
        datamodule.setup()
        model = build_model(cfg, datamodule.info)
        check_space(out_dir, model, datamodule.info)
        prints = fingerprints(datamodule)
        write_provenance(out_dir, prints, ckpt_path)
    except InputError:
        if created:  # no partial run folder for a run that never started
            _remove_failed_run(out_dir)
        if in_multirun():  # one job that cannot run does not stop the sweep (sweeps.py)
            record_failure(out_dir, str(sys.exc_info()[1]))
            return {}
        raise
    with atomic_path(out_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    guard = ReliabilityCallback(prints, cfg.on_nonfinite)
    m = cfg.metrics
    evaluation = EvaluationCallback(
        datamodule, str(out_dir), ScoreOptions(m.fsc_mask, m.per_image_n, m.save_volumes, m.figures, m.per_conformation),
        eval_every=m.eval_every, header={"dataset": cfg.data.name, "seed": cfg.seed},
    )
    evaluation.header["config_hash"] = config_hash(cfg)  # what makes metrics.json complete for a sweep
    prepare_ddp_relaunch(out_dir)
    trainer = L.Trainer(
        **_trainer_kwargs(cfg, model.default_epochs),
        default_root_dir=str(out_dir),
        logger=build_loggers(cfg, out_dir) or False,
        callbacks=[EpochCheckpoint(dirpath=out_dir / "checkpoints", save_last=True), evaluation, guard],
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # DDP: the datamodule shards each batch itself (data/particles.py)
    )
    trainer.callbacks.append(SumBuffersAcrossRanks())  # DDP: accumulator methods sum over ranks
    if ckpt_path:
        print(f"[cryobench_lab] resuming from {ckpt_path}", file=sys.stderr)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.global_rank != 0:  # DDP: only rank 0 scores and writes (callbacks/evaluation.py)
        return {}
    if evaluation.metrics:  # empty on DDP ranks other than 0, which score nothing
        evaluation.metrics["train/skipped_steps"] = guard.skipped_steps
        write_json_atomic(out_dir / "metrics.json", evaluation.metrics)
    _print_summary(evaluation.metrics, out_dir)
    finish_wandb()  # the next job of a sweep gets its own W&B run (wandb_tools.py)
    return evaluation.metrics


def _remove_failed_run(out_dir: Path) -> None:
    """Delete a run folder that holds nothing but Hydra's bookkeeping."""
    leftovers = {p.name for p in out_dir.iterdir()} - {".hydra", "main.log", "__main__.log", "provenance.json"} if out_dir.exists() else set()
    if out_dir.exists() and not leftovers:
        shutil.rmtree(out_dir, ignore_errors=True)


def _print_summary(metrics: dict, out_dir: Path) -> None:
    keys = [k for k in ("val/fsc_auc_mean", "val/fsc_auc_std", "val/fsc_res_0.5", "val/ari") if k in metrics]
    summary = "  ".join(f"{k}={metrics[k]:.4g}" for k in keys)
    print(f"[cryobench_lab] {metrics.get('method')}: {summary}\n[cryobench_lab] outputs in {out_dir}", file=sys.stderr)
