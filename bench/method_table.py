"""One row per method × dataset: consensus floor, oracle, the method, cryoDRGN, per-state min/median/max.

Reads finished run folders (``metrics.json`` holds the method's per-state FSC-AUC and, since 2026-12-08, the
floor and oracle on the same data: ``val/floor_fsc_auc_mean``, ``val/oracle_fsc_auc_mean``), or runs them
first with ``--run``:

    .venv/bin/python bench/method_table.py --run --out bench/results/method_table \
        hydra:tomotwin3 segvae:adk partgmm:assembly multiclass:tomotwin3 backproject:tomotwin3
    .venv/bin/python bench/method_table.py --runs-root bench/results/method_table --cryodrgn tomotwin3=0.3458 \
        --cryodrgn adk=0.2784 --cryodrgn assembly=0.3016

cryoDRGN numbers (``train_vae`` 3×256, 20 epochs, same images) are measured by ``bench/vs_cryodrgn.py``
and passed in; they do not depend on this code. Writes ``<out>/table.md`` and ``<out>/table.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def _command(model: str, data: str) -> str:
    return f"python -m cryobench_lab model={model} data={data} logger=csv"


def run_one(model: str, data: str, out: Path) -> Path:
    folder = out / f"{model}_{data}"
    if not (folder / "metrics.json").is_file():
        cmd = [sys.executable, "-m", "cryobench_lab", f"model={model}", f"data={data}", "logger=csv",
               f"hydra.run.dir={folder}", "trainer.enable_progress_bar=false"]
        subprocess.run(cmd, check=True, env=dict(os.environ, WANDB_MODE="disabled"))
    return folder


def row(folder: Path, cryodrgn: dict[str, float]) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    per_state = [s["auc"] for s in m.get("val/per_state") or []]
    cfg = (folder / "config.yaml").read_text() if (folder / "config.yaml").is_file() else ""
    data = m.get("dataset")
    return {
        "method": m.get("method"), "dataset": data,
        "floor": m.get("val/floor_fsc_auc_mean", math.nan), "oracle": m.get("val/oracle_fsc_auc_mean", math.nan),
        "method_fsc_auc": m.get("val/fsc_auc_mean", math.nan),
        "method_fsc_auc_gtmask": m.get("val/fsc_auc_mean_gtmask", math.nan),
        "oracle_gtmask": m.get("val/oracle_fsc_auc_mean_gtmask", math.nan),
        "cryodrgn": cryodrgn.get(data, math.nan),
        "state_min": float(np.min(per_state)) if per_state else math.nan,
        "state_median": float(np.median(per_state)) if per_state else math.nan,
        "state_max": float(np.max(per_state)) if per_state else math.nan,
        "ari": m.get("val/ari", math.nan),
        "command": _command(m.get("method"), data) if cfg else "",
        "folder": str(folder),
    }


def markdown(rows: list[dict]) -> str:
    head = ("| method | dataset | floor (consensus) | oracle | method | GT mask: method / oracle | cryoDRGN | "
            "per-state min / median / max | ARI | command |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def f(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    return head + "".join(
        f"| {r['method']} | {r['dataset']} | {f(r['floor'])} | {f(r['oracle'])} | **{f(r['method_fsc_auc'])}** | "
        f"{f(r['method_fsc_auc_gtmask'])} / {f(r['oracle_gtmask'])} | {f(r['cryodrgn'])} | {f(r['state_min'])} / {f(r['state_median'])} / "
        f"{f(r['state_max'])} | {f(r['ari'])} | `{r['command']}` |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench/method_table.py", description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="*", help="model:data pairs to run (with --run) or to read from --runs-root")
    ap.add_argument("--run", action="store_true", help="run the pairs that have no metrics.json yet")
    ap.add_argument("--out", type=Path, default=Path("bench/results/method_table"))
    ap.add_argument("--runs-root", type=Path, help="folder of finished runs named <model>_<data> (default: --out)")
    ap.add_argument("--cryodrgn", action="append", default=[], metavar="DATA=FSC_AUC")
    args = ap.parse_args()
    root = args.runs_root or args.out
    cryodrgn = {k: float(v) for k, v in (item.split("=", 1) for item in args.cryodrgn)}
    folders = []
    for pair in args.pairs:
        model, data = pair.split(":", 1)
        folders.append(run_one(model, data, root) if args.run else root / f"{model}_{data}")
    if not args.pairs:
        folders = sorted(p.parent for p in root.glob("*/metrics.json"))
    rows = [row(f, cryodrgn) for f in folders if (f / "metrics.json").is_file()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    (args.out / "table.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
