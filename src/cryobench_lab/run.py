"""Build data, model, loggers and trainer from a composed config; train; score; write outputs."""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from cryobench_lab.callbacks.evaluation import EvaluationCallback, ScoreOptions
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.errors import InputError
from cryobench_lab.sweeps import config_hash, finished_metrics, in_multirun, prepare_ddp_relaunch, record_failure


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
    try:
        return hydra.utils.get_class(target)(info=info, **kwargs)
    except ValueError as err:  # a model that cannot run on these data says why
        raise InputError(f"model={cfg.model.name}: {err}") from None


def _check_writable(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / ".write_test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise InputError(f"output folder {out_dir} is not writable ({err.strerror}); set hydra.run.dir=<writable path>") from None


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
        _check_writable(out_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = ParticleDataModule(cfg.data, seed=cfg.seed)
        datamodule.setup()
        model = build_model(cfg, datamodule.info)
    except InputError:
        if created:  # no partial run folder for a run that never started
            _remove_failed_run(out_dir)
        if in_multirun():  # one job that cannot run does not stop the sweep (sweeps.py)
            record_failure(out_dir, str(sys.exc_info()[1]))
            return {}
        raise
    OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
    m = cfg.metrics
    evaluation = EvaluationCallback(
        datamodule, str(out_dir), ScoreOptions(m.fsc_mask, m.per_image_n, m.save_volumes, m.figures),
        eval_every=m.eval_every, header={"dataset": cfg.data.name, "seed": cfg.seed},
    )
    evaluation.header["config_hash"] = config_hash(cfg)  # what makes metrics.json complete for a sweep
    prepare_ddp_relaunch(out_dir)
    trainer = L.Trainer(
        **_trainer_kwargs(cfg, model.default_epochs),
        default_root_dir=str(out_dir),
        logger=build_loggers(cfg, out_dir) or False,
        callbacks=[ModelCheckpoint(dirpath=out_dir / "checkpoints", save_last=True), evaluation],
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # DDP: the datamodule shards each batch itself (data/particles.py)
    )
    trainer.fit(model, datamodule=datamodule)
    _print_summary(evaluation.metrics, out_dir)
    return evaluation.metrics


def _remove_failed_run(out_dir: Path) -> None:
    """Delete a run folder that holds nothing but Hydra's bookkeeping."""
    leftovers = {p.name for p in out_dir.iterdir()} - {".hydra", "main.log", "__main__.log"} if out_dir.exists() else set()
    if out_dir.exists() and not leftovers:
        shutil.rmtree(out_dir, ignore_errors=True)


def _print_summary(metrics: dict, out_dir: Path) -> None:
    keys = [k for k in ("val/fsc_auc_mean", "val/fsc_auc_std", "val/fsc_res_0.5", "val/ari") if k in metrics]
    summary = "  ".join(f"{k}={metrics[k]:.4g}" for k in keys)
    print(f"[cryobench_lab] {metrics.get('method')}: {summary}\n[cryobench_lab] outputs in {out_dir}", file=sys.stderr)
