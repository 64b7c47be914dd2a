"""A leaderboard table: this project's runs beside the published CryoBench numbers.

    python -m cryobench_lab.leaderboard RUN_DIR [RUN_DIR ...] --out leaderboard.md [--csv leaderboard.csv]

Each RUN_DIR is a finished run folder (``metrics.json`` + ``config.yaml``). The table's cells are the
per-conformation FSC-AUC, mean over ground-truth states (CryoBench's leaderboard number, domain.md §3; trapezoid
over cycles/px, not normalised, ≈ 0.49 for a perfect map at D = 128). A run cell also gives the masked value
(the dataset's ``init_mask``) when the run has one. Published rows are copied from the CryoBench paper via
domain.md §3 and are labelled "published, not re-run": nobody re-ran them here, and they were measured at
D = 128 on the full downloads, so a run on a replica, a smoke run or another box is not comparable to them
(the run's box, image count and smoke flag are printed beside it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path, write_text_atomic

#: Dataset columns: data config name → CryoBench dataset name.
DATASETS = {
    "cryobench_igg1d": "IgG-1D",
    "cryobench_iggrl": "IgG-RL",
    "cryobench_ribosembly": "Ribosembly",
    "cryobench_tomotwin100": "Tomotwin-100",
    "cryobench_spikemd": "Spike-MD",
}

#: Published per-conformation FSC-AUC (mean over states), CryoBench (domain.md §3). None: not reported.
PUBLISHED = {
    "3D classification": {"IgG-1D": 0.297, "IgG-RL": 0.309, "Ribosembly": 0.289},
    "cryoDRGN": {"IgG-1D": 0.366, "IgG-RL": 0.349, "Ribosembly": 0.415},
    "DRGN-AI-fixed": {"IgG-1D": 0.366, "IgG-RL": 0.355, "Ribosembly": 0.372},
    "3DFlex": {"IgG-1D": 0.336, "IgG-RL": 0.339, "Ribosembly": None},
    "3DVA": {"IgG-1D": 0.351, "IgG-RL": 0.341, "Ribosembly": 0.375},
    "RECOVAR": {"IgG-1D": 0.391, "IgG-RL": 0.372, "Ribosembly": 0.430},
    "CryoSPIRE": {"IgG-1D": 0.402, "IgG-RL": 0.386, "Ribosembly": 0.427},
}
PUBLISHED_LABEL = "published, not re-run (CryoBench; domain.md §3)"

#: This project's method → the published method it reimplements (rows are placed next to each other).
COUNTERPART = {"classify3d": "3D classification", "multiclass": "3D classification", "cryodrgn": "cryoDRGN",
               "drgnai": "DRGN-AI-fixed", "partgmm": "CryoSPIRE"}


def read_run(run_dir: str | Path) -> dict:
    """One run folder → ``{method, dataset, column, auc, auc_masked, auc_std, image_auc, ari, box_size,
    n_particles, smoke, root, replica, run}`` (NaN where the run did not report a metric)."""
    run = Path(run_dir)
    metrics_file, config_file = run / "metrics.json", run / "config.yaml"
    for f in (metrics_file, config_file):
        if not f.is_file():
            raise InputError(f"{f}: not found; pass finished run folders (they hold metrics.json and config.yaml)")
    try:
        m = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{metrics_file}: not valid JSON ({err}); re-score the run with python -m cryobench_lab.eval") from None
    cfg = OmegaConf.load(config_file)
    name = str(cfg.data.name)

    def get(key):
        value = m.get(f"val/{key}")
        return float(value) if isinstance(value, (int, float)) else math.nan

    return {
        "method": str(m.get("method", cfg.model.get("name", "?"))),
        "dataset": name,
        "column": DATASETS.get(name, name),
        "auc": get("fsc_auc_mean"),
        "auc_std": get("fsc_auc_std"),
        "auc_masked": get("fsc_auc_mean_masked"),
        "image_auc": get("fsc_image_auc_mean"),
        "ari": get("ari"),
        "box_size": m.get("box_size"),
        "n_particles": m.get("n_particles_total", m.get("n_particles")),  # older runs: n_particles
        "smoke": bool(cfg.get("smoke", False)),
        "root": str(cfg.data.get("root") or ""),
        # a simulator-written replica (simulate --layout cryobench), not the download
        "replica": bool(cfg.data.get("root")) and (Path(str(cfg.data.root)) / "replica.json").is_file(),
        "run": str(run),
    }


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _run_cell(r: dict) -> str:
    if math.isnan(r["auc"]) and not math.isnan(r["image_auc"]):  # Spike-MD: scored per image only
        return f"per-image {_fmt(r['image_auc'])}"
    cell = _fmt(r["auc"])
    if not math.isnan(r["auc_masked"]):
        cell += f" (masked {_fmt(r['auc_masked'])})"
    return cell


def _run_source(r: dict) -> str:
    notes = [f"D={r['box_size']}", f"{r['n_particles']} images"]
    if r["smoke"]:
        notes.append("smoke")
    if r["replica"]:
        notes.append("simulated replica, not the download")
    return "this project, run here (" + ", ".join(notes) + ")"


def leaderboard_rows(runs: list[dict]) -> list[dict]:
    """Table rows ``{method, source, <dataset column>: cell}``: every published method, each followed by this
    project's runs of its counterpart, then runs of methods without a published counterpart."""
    columns = list(DATASETS.values())
    rows = []
    placed = set()
    for published, values in PUBLISHED.items():
        rows.append({"method": published, "source": PUBLISHED_LABEL,
                     **{c: _fmt(values.get(c)) for c in columns}})
        for i, r in enumerate(runs):
            if COUNTERPART.get(r["method"]) == published:
                rows.append({"method": r["method"], "source": _run_source(r), **{c: "" for c in columns},
                             r["column"]: _run_cell(r)})
                placed.add(i)
    for i, r in enumerate(runs):
        if i not in placed:
            rows.append({"method": r["method"], "source": _run_source(r), **{c: "" for c in columns},
                         r["column"]: _run_cell(r)})
    return rows


def write_leaderboard(run_dirs, out: str | Path, csv_out: str | Path | None = None) -> Path:
    """Write the Markdown table (and optionally CSV) for ``run_dirs`` → the Markdown path."""
    runs = [read_run(d) for d in run_dirs]
    rows = leaderboard_rows(runs)
    columns = ["method", "source", *DATASETS.values()]
    lines = [
        "# CryoBench leaderboard: per-conformation FSC-AUC (mean over states)",
        "",
        "Rows marked *" + PUBLISHED_LABEL + "* are the paper's numbers, copied, never re-run here. "
        "Rows marked *this project, run here* come from the run folders listed below; they are comparable "
        "to the published ones only when run on the real download at D=128 without +smoke.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    lines += ["", "## Runs", "",
              "| method | dataset | data.root | D | images | smoke | FSC-AUC mean ± std | masked | per-image FSC-AUC | ARI | run |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['column']} | {r['root']} | {r['box_size']} | {r['n_particles']} | "
                     f"{'yes' if r['smoke'] else 'no'} | {_fmt(r['auc'])} ± {_fmt(r['auc_std'])} | "
                     f"{_fmt(r['auc_masked'])} | {_fmt(r['image_auc'])} | {_fmt(r['ari'])} | {r['run']} |")
    out = write_text_atomic(out, "\n".join(lines) + "\n")
    if csv_out is not None:
        with atomic_path(csv_out) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cryobench_lab.leaderboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders (metrics.json, config.yaml)")
    ap.add_argument("--out", required=True, help="Markdown file to write")
    ap.add_argument("--csv", help="also write the table as CSV")
    args = ap.parse_args(argv)
    try:
        path = write_leaderboard(args.runs, args.out, args.csv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
