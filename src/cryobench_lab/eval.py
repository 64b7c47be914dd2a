"""Re-score a finished run: ``python -m cryobench_lab.eval run_dir=<run folder> [ckpt=...] [out=...] [key=value ...]``.

Loads the run's resolved ``config.yaml`` and checkpoint (default ``checkpoints/last.ckpt``), rebuilds its
dataset and model, and runs the same scorer as training (callbacks/evaluation.py). Results go to
``<run_dir>/eval/`` unless ``out=`` says otherwise. Further ``key=value`` pairs override the stored config,
for example ``data.particles=other.star data.labels=... data.gt_volumes=...`` to score against another
dataset with the same ground-truth states, or ``metrics.fsc_mask=gt``.

The checkpoint (or the run's ``provenance.json``) records the fingerprints of the data it was trained on
(provenance.py). Scoring against particles or ground-truth states with other fingerprints is refused, since
per-image tables and metrics would then silently pair images with the wrong particles or states; pass
``force=true`` to score anyway (the mismatch is recorded in the output's ``metrics.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cryobench_lab.callbacks.evaluation import ScoreOptions, score_model
from cryobench_lab.cli import fail
from cryobench_lab.config import TrainConfig
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import write_json_atomic
from cryobench_lab.provenance import fingerprints
from cryobench_lab.run import build_model


def _check_fingerprints(trained: dict, now: dict, ckpt: Path, force: bool) -> list[str]:
    """Names of the fingerprints that differ; InputError unless ``force``."""
    differ = [k for k in ("dataset", "ground_truth") if k in trained and trained[k] != now[k]]
    if differ and not force:
        what = " and ".join(k.replace("_", " ") for k in differ)
        raise InputError(f"{ckpt}: was trained on data with another {what} fingerprint than the data given now "
                         f"(trained {str(trained[differ[0]])[:80]}, now {str(now[differ[0]])[:80]}); score it on "
                         "its own data, or pass force=true")
    return differ


def load_trained(
    run_dir: Path, ckpt: Path | None = None, overrides: list[str] = (), force: bool = False,
) -> tuple:
    """(config, set-up datamodule, model with the checkpoint's weights, names of differing fingerprints) of
    a finished run. Refuses (InputError) data whose fingerprints differ from the checkpoint's unless ``force``.
    """
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise InputError(f"{run_dir}: no config.yaml; pass run_dir= a folder written by python -m cryobench_lab")
    ckpt = ckpt or run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise InputError(f"{ckpt}: checkpoint not found; pass ckpt=<path to a .ckpt>")
    stored = OmegaConf.load(config_path)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), stored, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:
        raise InputError(f"eval: {' '.join(str(err).split())}") from None
    datamodule = ParticleDataModule(cfg.data, seed=cfg.seed)
    datamodule.setup()
    model = build_model(cfg, datamodule.info)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    trained = checkpoint.get("cryobench_lab") or {}
    provenance = run_dir / "provenance.json"
    if "dataset" not in trained and provenance.is_file():
        trained = json.loads(provenance.read_text())
    mismatch = _check_fingerprints(trained, fingerprints(datamodule), ckpt, force)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise InputError(f"{ckpt}: does not fit model={cfg.model.name} on this dataset ({str(err).splitlines()[0]})") from None
    return cfg, datamodule, model, mismatch


def evaluate_run(
    run_dir: Path, ckpt: Path | None = None, out: Path | None = None, overrides: list[str] = (), force: bool = False,
) -> dict:
    """Score the checkpoint of ``run_dir``; returns the metrics written to ``<out>/metrics.json``.

    Refuses (InputError) data whose fingerprints differ from the checkpoint's unless ``force``.
    """
    ckpt = ckpt or run_dir / "checkpoints" / "last.ckpt"
    cfg, datamodule, model, mismatch = load_trained(run_dir, ckpt, overrides, force)
    out = out or run_dir / "eval"
    m = cfg.metrics
    metrics, _ = score_model(model, datamodule, out, ScoreOptions(m.fsc_mask, m.per_image_n, m.save_volumes, m.figures, m.per_conformation, m.references))
    payload = {"method": cfg.model.name, "dataset": cfg.data.name, "checkpoint": str(ckpt), **metrics}
    if mismatch:
        payload["forced_fingerprint_mismatch"] = mismatch
    write_json_atomic(out / "metrics.json", payload)
    return payload


USAGE = """usage: python -m cryobench_lab.eval run_dir=<run folder> [ckpt=<file.ckpt>] [out=<folder>] [force=true] [key=value ...]

Re-score a finished run from its checkpoint (default: checkpoints/last.ckpt) into <run folder>/eval/ (or out=).
key=value overrides the run's config, e.g. data.gt_volumes=<folder> or metrics=fast; scoring against data whose
fingerprint differs from the training data's needs force=true."""


def main(argv: list[str] | None = None) -> None:
    argv = argv if argv is not None else sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if "run_dir" not in args:
        fail(USAGE.splitlines()[0])
    special = {"run_dir", "ckpt", "out", "force"}
    overrides = [f"{k}={v}" for k, v in args.items() if k not in special]
    try:
        metrics = evaluate_run(
            Path(args["run_dir"]), Path(args["ckpt"]) if "ckpt" in args else None,
            Path(args["out"]) if "out" in args else None, overrides,
            force=args.get("force", "false").lower() in ("true", "1", "yes"),
        )
    except InputError as err:
        fail(str(err))
    keys = [k for k in ("val/fsc_auc_mean", "val/fsc_res_0.5", "val/ari") if k in metrics]
    print("  ".join(f"{k}={metrics[k]:.4g}" for k in keys))


if __name__ == "__main__":
    main()
