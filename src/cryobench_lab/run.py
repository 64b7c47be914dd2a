"""Build data, model, loggers and trainer from a composed config; train; score; write outputs."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import shutil
import sys
import uuid
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from cryobench_lab.callbacks.distributed import SumBuffersAcrossRanks
from cryobench_lab.callbacks.evaluation import EvaluationCallback, ScoreOptions
from cryobench_lab.callbacks.exports import LatentSnapshots
from cryobench_lab.callbacks.progress import RunLog, RunProgressBar, append_run_log, quiet_library_noise
from cryobench_lab.callbacks.reliability import NONFINITE_MODES, AtomicCheckpointIO, EpochCheckpoint, ReliabilityCallback
from cryobench_lab.config import validate
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path, write_json_atomic
from cryobench_lab.loggers import build_loggers, rows_before
from cryobench_lab.provenance import environment, fingerprints, ground_truth_pairing
from cryobench_lab.run_folder import (
    LOCK,
    clear_marker,
    first_process,
    move_run_aside,
    newest_intact_checkpoint,
    run_lock,
    write_marker,
)
from cryobench_lab.sweeps import (
    config_hash,
    finished_metrics,
    in_multirun,
    prepare_ddp_relaunch,
    record_failure,
    set_aside_stale_run,
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


# Keys that may change between a run and its resume: how data are served, and where the files are (moved
# files are checked by the dataset and ground-truth fingerprints of provenance.json instead).
RESUMABLE_CHANGES = {
    "data.num_workers", "data.lazy", "data.memory_cap_gb", "data.cache_dir", "data.datadir", "data.particles",
    "data.poses", "data.ctf", "data.labels", "data.gt_volumes", "data.root",
}


def run_identity(cfg: DictConfig) -> dict:
    """The config values a resume must share with the run it continues: data, model and seed, except
    :data:`RESUMABLE_CHANGES` (flat dotted keys, resolved). Every checkpoint carries them (``run_config``)."""
    now = _flat(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in now.items() if k.split(".")[0] in ("data", "model", "seed") and k not in RESUMABLE_CHANGES}


def _refuse_other_run(where: str, key: str, old, new) -> None:
    raise InputError(f"{where} with {key}={old} (now {new}); resume with the same data, model and seed, or pass "
                     "resume=false to start over (the old run is moved aside)")


def resume_checkpoint(cfg: DictConfig, out_dir: Path) -> tuple[str, int, int] | None:
    """(path, epoch, global step) of the checkpoint to continue from, or None; see ``TrainConfig.resume``.

    ``checkpoints/last.ckpt``, or when it is unreadable the newest intact epoch checkpoint (reported on stderr).
    A folder whose ``config.yaml`` or checkpoint belongs to a run with other data, model or seed is refused;
    ``resume=false`` moves the whole previous run aside (``replaced-<time>/``) rather than deleting it.
    """
    ckpt_dir = out_dir / "checkpoints"
    if cfg.resume is False:
        if first_process() and (aside := move_run_aside(out_dir)):
            print(f"[cryobench_lab] resume=false: the previous run in {out_dir} is now in {aside.name}/", file=sys.stderr)
        return None
    path, ckpt, problems = newest_intact_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else (None, None, [])
    if path is None:
        if problems:
            raise InputError(f"no intact checkpoint in {ckpt_dir} ({'; '.join(problems)}); pass resume=false to start "
                             "over (the old run is moved aside)")
        if cfg.resume:
            raise InputError(f"resume=true but {ckpt_dir / 'last.ckpt'} does not exist; pass hydra.run.dir=<the folder "
                             "of the run to resume>")
        return None
    if problems:
        print(f"[cryobench_lab] {'; '.join(problems)}; resuming from {path}, the newest intact checkpoint", file=sys.stderr)
    now = run_identity(cfg)
    stored_path = out_dir / "config.yaml"
    if stored_path.is_file():
        stored = run_identity(OmegaConf.load(stored_path))
        for key in sorted(set(stored) | set(now)):
            if stored.get(key) != now.get(key):
                _refuse_other_run(f"{out_dir} holds a run", key, stored.get(key), now.get(key))
    trained = (ckpt.get("cryobench_lab") or {}).get("run_config")
    if trained is not None:  # config.yaml may be another run's (written by a run that raced this one)
        for key in sorted(set(trained) | set(now)):
            if trained.get(key) != now.get(key):
                _refuse_other_run(f"{path} was written by a run", key, trained.get(key), now.get(key))
    return str(path), int(ckpt.get("epoch", 0)), int(ckpt.get("global_step", 0))


def write_provenance(out_dir: Path, prints: dict, resumed_from: str | None, pairing: dict | None = None) -> dict:
    """``provenance.json``: versions, dataset fingerprints (provenance.py), the volume file of each state
    (``ground_truth_pairing``) and the W&B run id (a fresh one for a fresh run); a resume appends an entry,
    keeps the W&B run id and is refused when the data changed since the run started. Returns the record ({}
    in the other processes of a distributed run)."""
    if not first_process():
        return {}
    path = out_dir / "provenance.json"
    record = {"versions": environment(), **prints, "ground_truth_pairing": pairing,
              "wandb_run_id": uuid.uuid4().hex[:8], "resumes": []}
    if resumed_from and path.is_file():
        record = json.loads(path.read_text())
        for key in ("dataset", "ground_truth"):
            if record.get(key) != prints[key]:
                raise InputError(f"{out_dir}: the {key.replace('_', ' ')} fingerprint differs from the one this "
                                 "run started with (provenance.json); resume on the same files or pass "
                                 "resume=false to start over")
        record.setdefault("resumes", []).append({"checkpoint": resumed_from, "versions": environment()})
        record.setdefault("wandb_run_id", uuid.uuid4().hex[:8])  # a run started before ids were recorded
    write_json_atomic(path, record)
    return record


def _trainer_kwargs(cfg: DictConfig, default_epochs: int) -> dict:
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    if t["max_epochs"] is None:
        t["max_epochs"] = default_epochs
    if t["limit_train_batches"] is None:
        del t["limit_train_batches"]
    return t


def _input_error(out_dir: Path, created: bool) -> dict:
    """After an InputError before training: no partial run folder; in a sweep, record it and go on."""
    if created:  # no partial run folder for a run that never started
        _remove_failed_run(out_dir)
    if in_multirun():  # one job that cannot run does not stop the sweep (sweeps.py)
        record_failure(out_dir, str(sys.exc_info()[1]))
        return {}
    raise  # the InputError being handled by the caller


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; returns the metrics written to ``metrics.json``.

    The run holds the folder's lock throughout (run_folder.py); its last write is ``complete.json``.
    """
    out_dir = Path(cfg.output_dir)
    if cfg.skip_finished and (done := finished_metrics(out_dir, cfg)) is not None:
        print(f"[cryobench_lab] skipped: {out_dir} is complete for this config (complete.json)", file=sys.stderr)
        return done
    quiet_library_noise()
    created = not (out_dir / "metrics.json").exists()
    try:
        validate(cfg)
        _check_writable(out_dir)
    except InputError:
        return _input_error(out_dir, created)
    with contextlib.ExitStack() as held:
        if first_process():  # DDP ranks > 0 run inside the first process's folder and lock
            try:
                held.enter_context(run_lock(out_dir))
            except InputError as err:
                if not in_multirun():
                    raise
                print(f"error: {err} (sweep continues)", file=sys.stderr)  # the holder runs this job
                return {}
        return _run_locked(cfg, out_dir, created)


def _lr_hint(cfg: DictConfig, model) -> str | None:
    """The override that divides the model's learning rate by 10 (None: the model has no ``lr``)."""
    lr = getattr(model, "hparams", {}).get("lr")
    if not isinstance(lr, (int, float)):
        return None
    return f"{'' if 'lr' in cfg.model else '+'}model.lr={lr / 10:g}"


def _run_locked(cfg: DictConfig, out_dir: Path, created: bool) -> dict:
    if cfg.skip_finished and first_process() and (aside := set_aside_stale_run(out_dir, cfg)):
        print(f"[cryobench_lab] {out_dir} held a run of another config; it is now in {aside.name}/", file=sys.stderr)
    if cfg.threads:  # a sweep's parallel jobs share the cores (conf/hydra/launcher/joblib_local.yaml)
        torch.set_num_threads(cfg.threads)
    try:
        _check_model_keys(cfg.model)
        if cfg.on_nonfinite not in NONFINITE_MODES:
            raise InputError(f"on_nonfinite={cfg.on_nonfinite!r} is unknown; use stop or skip")
        check_devices(cfg.trainer)
        check_inputs_not_empty(cfg.data)
        resume = resume_checkpoint(cfg, out_dir)
        ckpt_path = resume[0] if resume else None
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = ParticleDataModule(cfg.data, seed=cfg.seed)
        datamodule.setup()
        model = build_model(cfg, datamodule.info)
        check_space(out_dir, model, datamodule.info)
        prints = fingerprints(datamodule)
        record = write_provenance(out_dir, prints, ckpt_path, ground_truth_pairing(datamodule.info))
    except InputError:
        return _input_error(out_dir, created)
    if first_process():
        clear_marker(out_dir)  # outputs are about to be rewritten
    with atomic_path(out_dir / "config.yaml") as tmp:
        OmegaConf.save(cfg, tmp, resolve=True)
    identity = run_identity(cfg)
    run_hash = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    guard = ReliabilityCallback({**prints, "run_config": identity, "run_hash": run_hash}, cfg.on_nonfinite,
                                lr_hint=_lr_hint(cfg, model))
    m = cfg.metrics
    evaluation = EvaluationCallback(
        datamodule, str(out_dir), ScoreOptions(m.fsc_mask, m.per_image_n, m.save_volumes, m.figures, m.per_conformation, m.references),
        eval_every=m.eval_every, header={"dataset": cfg.data.name, "seed": cfg.seed},
    )
    evaluation.header["config_hash"] = config_hash(cfg)  # what makes metrics.json complete for a sweep
    prepare_ddp_relaunch(out_dir)
    keep = rows_before(resume[1], resume[2]) if resume else None
    run_log = RunLog(out_dir / "run.log")
    shown = [RunProgressBar(run_log)] if cfg.trainer.enable_progress_bar else []
    trainer = L.Trainer(
        **_trainer_kwargs(cfg, model.default_epochs),
        default_root_dir=str(out_dir),
        logger=build_loggers(cfg, out_dir, keep=keep, wandb_id=record.get("wandb_run_id")) or False,
        callbacks=[EpochCheckpoint(dirpath=out_dir / "checkpoints", save_last=True), evaluation, guard, run_log, *shown],
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # DDP: the datamodule shards each batch itself (data/particles.py)
    )
    trainer.callbacks.append(SumBuffersAcrossRanks())  # DDP: accumulator methods sum over ranks
    trainer.callbacks.append(LatentSnapshots(datamodule, str(out_dir), m.latents_every))  # z.<epoch>.pkl
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
    if evaluation.metrics:
        write_marker(out_dir, config_hash(cfg))  # last: every output (the model's classes/ too) is written
    return evaluation.metrics


def _remove_failed_run(out_dir: Path) -> None:
    """Delete a run folder that holds nothing but Hydra's bookkeeping."""
    bookkeeping = {".hydra", "main.log", "__main__.log", "run.log", "provenance.json", LOCK}
    leftovers = {p.name for p in out_dir.iterdir()} - bookkeeping if out_dir.exists() else set()
    if out_dir.exists() and not leftovers:
        shutil.rmtree(out_dir, ignore_errors=True)


def _print_summary(metrics: dict, out_dir: Path) -> None:
    keys = [k for k in ("val/fsc_auc_mean", "val/fsc_auc_std", "val/fsc_res_0.5", "val/ari") if k in metrics]
    summary = "  ".join(f"{k}={metrics[k]:.4g}" for k in keys)
    print(f"[cryobench_lab] {metrics.get('method')}: {summary}\n[cryobench_lab] outputs in {out_dir}", file=sys.stderr)
    if metrics:
        append_run_log(out_dir / "run.log", f"{metrics.get('method')}: {summary}")
        append_run_log(out_dir / "run.log", f"outputs in {out_dir} (all metrics: metrics.json)")
