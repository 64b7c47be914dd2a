"""W&B helpers for sweeps: one W&B run per job, reading offline runs, and a dashboard built online.

- :func:`finish_wandb` closes a job's W&B run when the job ends. Without it the next job of an in-process
  sweep (Hydra's basic launcher runs jobs one after another in one process) would be logged into the same
  W&B run: Lightning's ``WandbLogger`` reuses a run that is still open.
- :func:`offline_run` reads the summary, config, group and tags (last value of every logged key) of an offline run from its
  ``run-*.wandb`` file, so tests can check that every run of a sweep carries the same keys.
- ``python -m cryobench_lab.wandb_tools --entity E --project P --group STUDY`` builds a W&B report for a
  study through W&B's public Reports API (package ``wandb-workspaces``; needs to be online and logged in):
  a runs table grouped by method and dataset (mean ± std over seeds) and bar charts of FSC-AUC, ARI, the
  atom metrics and images/s grouped by ``model.name``. It cannot be tested on a machine without network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: summary keys charted by the dashboard (those logged by every run of every method; callbacks/evaluation.py)
DASHBOARD_METRICS = ("val/fsc_auc_mean", "val/fsc_res_0.5", "val/fsc_res_0.143", "val/ari", "val/segmentation_ari",
                     "val/clashes_median", "train/wall_time_s", "train/images_per_s")


def finish_wandb() -> None:
    """Close the current W&B run, if this process opened one."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _records(path: Path):
    """Records of a ``.wandb`` file: W&B's LevelDB-style log (7-byte file header; 32 KiB blocks of records
    with a 7-byte header: CRC32 (4), length (2), type (1) = full 1 / first 2 / middle 3 / last 4)."""
    block = 32768
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the tail of a block too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            parts = [payload]
        elif kind in (3, 4):
            parts.append(payload)
            if kind == 4:
                yield b"".join(parts)


def offline_run(run_dir: Path) -> dict:
    """An offline W&B run folder (``.../wandb/offline-run-*``) read back: ``summary`` (last logged value of
    every key), ``config`` (top-level config sections), ``group`` and ``tags``."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no run-*.wandb file")
    out: dict = {"summary": {}, "config": {}, "group": None, "tags": []}
    for data in _records(files[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["tags"] = record.run.run_group, list(record.run.tags)
            items, target = record.run.config.update, "config"
        elif kind == "config":
            items, target = record.config.update, "config"
        elif kind in ("history", "summary"):
            items, target = (record.history.item if kind == "history" else record.summary.update), "summary"
        else:
            continue
        for item in items:
            key = item.key or "/".join(item.nested_key)
            if not key.startswith("_"):
                out[target][key] = json.loads(item.value_json)
    return out


def build_report(entity: str, project: str, group: str, title: str | None = None) -> str:
    """Create (save) a W&B report for the study ``group``; returns its URL. Needs wandb-workspaces and a login."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise SystemExit("error: the W&B report needs the wandb-workspaces package: pip install wandb-workspaces") from None
    runset = wr.Runset(entity=entity, project=project, name=group, filters=f"Config('logger.group') = '{group}'",
                       groupby=["model.name", "data.name"])
    panels = [wr.BarPlot(title=key, metrics=[key], groupby="model.name", groupby_aggfunc="mean",
                         groupby_rangefunc="stddev", orientation="v") for key in DASHBOARD_METRICS]
    report = wr.Report(
        entity=entity, project=project, title=title or f"cryobench_lab: {group}",
        description=f"Study {group}: mean ± std over seeds, grouped by method and dataset.",
        blocks=[
            wr.MarkdownBlock(text=f"Runs of W&B group **{group}** (one per method × ablation × dataset × seed). "
                             "The same numbers, offline: `python -m cryobench_lab.compare <sweep dir>`."),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
    )
    report.save()
    return report.url


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cryobench_lab.wandb_tools", description="Build a W&B report for a study")
    ap.add_argument("--entity", required=True)
    ap.add_argument("--project", default="cryobench_lab")
    ap.add_argument("--group", required=True, help="the study (logger.group), e.g. segmentation_ablation")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    print(build_report(args.entity, args.project, args.group, args.title))


if __name__ == "__main__":
    main()
