"""Compare runs: ``python -m cryobench_lab.compare <sweep dir or run dirs> [--out DIR]``.

Reads every run's ``metrics.json`` and ``config.yaml`` (a path that is not a run folder is searched for
them) and writes, into ``--out`` (default: ``<the one sweep dir>/compare``, else ``./compare``):

- ``summary.csv`` / ``summary.md``: one row per dataset × method × ablation, mean ± std over the seeds of
  every scalar metric (FSC-AUC, resolutions, ARI, distance correlations, clashes, wall time, images/s);
- ``runs.csv``: one row per run (the raw numbers behind the summary);
- part-aware mixtures (model=partgmm*) add the scalars of their ``parts/parts.json`` as ``val/part_ari``,
  ``val/anchor_ari``, ``val/coappearance_ari`` (each vs the nearest chain or domain), ``val/n_parts``,
  ``val/gate_absent_max`` and ``val/gate_present_min``;
- ``figures/fsc_curves.png`` (per-state FSC averaged over states, then seeds, one curve per row),
  ``figures/bars.png`` (the main metrics, bars with ±1 std error bars) and ``figures/ari_vs_k.png`` (when the
  number of classes varies);
- ``report.html``: the table and the figures in one self-contained file (figures embedded as base64).

Rows: ``dataset`` (data.name), ``method`` (the metrics' ``method``) and every other config key that varies
between runs of the same dataset and method, except the seed and how a run was executed
(:data:`cryobench_lab.sweeps.EXECUTION_KEYS`): those are the ablation columns (``data.snr``,
``model.n_classes`` ...). Runs that failed (``error.txt``, no ``metrics.json``) are listed in the report.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path, write_text_atomic
from cryobench_lab.plots import save_figure

#: metrics shown first (then every other scalar ``val/*`` key, alphabetically), and their short labels
PRIORITY = {
    "val/fsc_auc_mean": "FSC-AUC",
    "val/floor_fsc_auc_mean": "floor FSC-AUC",  # the consensus of all images: a method must beat it
    "val/oracle_fsc_auc_mean": "oracle FSC-AUC",  # per state, given the truth
    "val/fsc_auc_mean_gtmask": "FSC-AUC (GT mask)",
    "val/fsc_res_0.5": "res FSC=0.5 (Å)",
    "val/fsc_res_0.143": "res FSC=0.143 (Å)",
    "val/fsc_image_auc_mean": "per-image FSC-AUC",
    "val/ari": "ARI",
    "val/nmi": "NMI",
    "val/segmentation_ari": "segmentation ARI",
    "val/part_ari": "part ARI",
    "val/clashes_median": "clashes (median)",
    "val/clashes_mean": "clashes (mean)",
    "train/wall_time_s": "wall time (s)",
    "train/images_per_s": "images/s",
}
#: scalar keys that describe a run rather than measure it
DESCRIPTIVE = {"seed", "n_particles", "box_size", "apix", "train/epochs", "train/skipped_steps", "config_hash"}
#: parts/parts.json entries that are not measurements
PARTS_DESCRIPTIVE = {"n_anchors", "gaussians_near_atoms"}
#: metrics drawn as bars (those present)
BAR_METRICS = ("val/fsc_auc_mean", "val/ari", "val/segmentation_ari", "val/part_ari", "val/clashes_median", "train/images_per_s")
KEY_COLUMNS = ("dataset", "method")


def find_runs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(run folders with a metrics.json, failed run folders with an error.txt and no metrics.json)."""
    runs, failed = [], []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise InputError(f"{p} does not exist; pass a sweep folder or run folders")
        if (p / "metrics.json").is_file():
            runs.append(p)
            continue
        runs += sorted(m.parent for m in p.rglob("metrics.json") if ".submitit" not in m.parts)
        failed += sorted(e.parent for e in p.rglob("error.txt") if not (e.parent / "metrics.json").exists())
    if not runs:
        raise InputError(f"no metrics.json under {', '.join(map(str, paths))}; pass a sweep folder or run folders "
                         "of finished runs")
    return runs, failed


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, (list, dict)) else tree}


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _part_scalars(run: Path) -> dict:
    """``val/*`` scalars of a part-aware mixture's ``parts/parts.json``; the truth suffix (``_vs_chain``,
    ``_vs_domain``) is dropped so that datasets share a column."""
    path = run / "parts" / "parts.json"
    if not path.is_file():
        return {}
    parts = json.loads(path.read_text())
    return {"val/" + k.removesuffix("_vs_chain").removesuffix("_vs_domain"): float(v)
            for k, v in parts.items() if _is_scalar(v) and k not in PARTS_DESCRIPTIVE}


def load_run(run: Path) -> dict:
    """One run: ``metrics`` (scalars), ``config`` (flattened), ``per_state`` (FSC curves), ``path``."""
    from omegaconf import OmegaConf

    metrics = json.loads((run / "metrics.json").read_text())
    config = {}
    if (run / "config.yaml").is_file():
        config = _flatten(OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=False))
    scalars = {k: float(v) for k, v in metrics.items() if _is_scalar(v) and k not in DESCRIPTIVE}
    scalars.update(_part_scalars(run))
    return {
        "path": str(run), "metrics": scalars, "config": config,
        "dataset": str(metrics.get("dataset", config.get("data.name", "?"))),
        "method": str(metrics.get("method", config.get("model.name", "?"))),
        "seed": metrics.get("seed", config.get("seed")),
        "apix": metrics.get("apix"), "per_state": metrics.get("val/per_state") or [],
    }


def ablation_keys(runs: list[dict]) -> list[str]:
    """Config keys that vary within some (dataset, method) group, except the seed and execution keys."""
    from cryobench_lab.sweeps import EXECUTION_KEYS

    def excluded(key: str) -> bool:
        return key == "seed" or any(key == e or key.startswith(e + ".") for e in EXECUTION_KEYS)

    keys = sorted({k for r in runs for k in r["config"] if not excluded(k)})
    out = []
    for k in keys:
        groups: dict = {}
        for r in runs:
            groups.setdefault((r["dataset"], r["method"]), set()).add(json.dumps(r["config"].get(k), default=str))
        if any(len(v) > 1 for v in groups.values()):
            out.append(k)
    return out


def metric_order(runs: list[dict]) -> list[str]:
    present = {k for r in runs for k in r["metrics"]}
    first = [k for k in PRIORITY if k in present and k.startswith("val/")]
    rest = sorted(k for k in present if k.startswith("val/") and k not in PRIORITY)
    return first + rest + [k for k in PRIORITY if k in present and not k.startswith("val/")]


def tables(runs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    """(per-run table, summary table with ``<metric>_mean``/``_std``, ablation columns, metric keys)."""
    ablations = ablation_keys(runs)
    metrics = metric_order(runs)
    rows = []
    for r in runs:
        row = {"dataset": r["dataset"], "method": r["method"]}
        row.update({k: r["config"].get(k) for k in ablations})
        row.update({"seed": r["seed"], **{m: r["metrics"].get(m, math.nan) for m in metrics}, "path": r["path"]})
        rows.append(row)
    per_run = pd.DataFrame(rows)
    group_cols = [*KEY_COLUMNS, *ablations]
    summary_rows = []
    for key, g in per_run.groupby(group_cols, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(group_cols, key))
        row["n_seeds"] = len(g)
        for m in metrics:
            values = g[m].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[f"{m}_mean"] = float(finite.mean()) if len(finite) else math.nan
            row[f"{m}_std"] = float(finite.std(ddof=1)) if len(finite) > 1 else (0.0 if len(finite) else math.nan)
        summary_rows.append(row)
    return per_run, pd.DataFrame(summary_rows), ablations, metrics


def _fmt(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "–"
    digits = 3 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(summary: pd.DataFrame, ablations: list[str], metrics: list[str]) -> str:
    cols = [*KEY_COLUMNS, *ablations, "n_seeds"]
    head = cols + [PRIORITY.get(m, m.removeprefix("val/")) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        cells = [str(row[c]) for c in cols] + [_fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(row, ablations: list[str]) -> str:
    extra = ",".join(f"{a.split('.')[-1]}={row[a]}" for a in ablations)
    return f"{row['method']} / {row['dataset']}" + (f" ({extra})" if extra else "")


def fsc_figure(path: Path, runs: list[dict], per_run: pd.DataFrame, ablations: list[str]) -> Path | None:
    """Per-state FSC curves averaged over states then seeds, one line per summary row (x: 1/Å)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict = {}
    for r, (_, row) in zip(runs, per_run.iterrows()):
        states = [s for s in r["per_state"] if s.get("curve") is not None and s.get("freq") is not None]
        if not states or not r["apix"]:
            continue
        freq = np.asarray(states[0]["freq"], float) / float(r["apix"])  # cycles/px → 1/Å
        curve = np.mean([np.asarray(s["curve"], float) for s in states], axis=0)
        curves.setdefault(_label(row, ablations), []).append((freq, curve))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, items in curves.items():
        n = min(len(c) for _, c in items)
        freq = items[0][0][:n]
        stack = np.stack([c[:n] for _, c in items])
        mean = stack.mean(0)
        (line,) = ax.plot(freq, mean, label=f"{label} (n={len(items)})")
        if len(items) > 1:
            ax.fill_between(freq, mean - stack.std(0), mean + stack.std(0), color=line.get_color(), alpha=0.15)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.axhline(0.143, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC vs ground truth (mean over states)")
    ax.set_ylim(-0.05, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def bar_figure(path: Path, summary: pd.DataFrame, ablations: list[str]) -> Path | None:
    """Bars (mean) with ±1 std error bars over seeds for the main metrics present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in BAR_METRICS if f"{m}_mean" in summary and np.isfinite(summary[f"{m}_mean"]).any()]
    if not shown:
        return None
    labels = [_label(row, ablations) for _, row in summary.iterrows()]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown) + 1, 0.35 * len(labels) + 2), squeeze=False)
    y = np.arange(len(labels))
    for ax, m in zip(axes[0], shown):
        ax.barh(y, summary[f"{m}_mean"].fillna(0), xerr=summary[f"{m}_std"].fillna(0), capsize=3, color="C0")
        ax.set_title(PRIORITY.get(m, m), fontsize=9)
        ax.set_yticks(y, labels if ax is axes[0][0] else [], fontsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def ari_vs_k_figure(path: Path, per_run: pd.DataFrame, runs: list[dict]) -> Path | None:
    """ARI (mean ± std over seeds) against the number of classes K, one line per method/dataset/other setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = [r["config"].get("model.n_classes") for r in runs]
    if "val/ari" not in per_run or len({v for v in k if v is not None}) < 2:
        return None
    df = per_run.assign(K=k).dropna(subset=["K"])
    others = [c for c in df.columns if c.startswith(("model.", "data.")) and c != "model.n_classes"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, g in df.groupby(["method", "dataset", *others], dropna=False):
        stats = g.groupby("K")["val/ari"].agg(["mean", "std"]).fillna(0)
        label = " / ".join(str(v) for v in (key if isinstance(key, tuple) else (key,)))
        ax.errorbar(stats.index.astype(float), stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=label)
    ax.set_xlabel("number of classes K")
    ax.set_ylabel("ARI vs ground-truth states")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def html_report(path: Path, title: str, summary_md: str, summary: pd.DataFrame, ablations: list[str],
                metrics: list[str], figures: list[Path], failed: list[Path], n_runs: int) -> None:
    """One self-contained HTML file: the table and every figure (PNG, base64)."""
    cols = [*KEY_COLUMNS, *ablations, "n_seeds"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols + [PRIORITY.get(m, m.removeprefix('val/')) for m in metrics])
    body = []
    for _, row in summary.iterrows():
        cells = [html.escape(str(row[c])) for c in cols] + [_fmt(row[f"{m}_mean"], row[f"{m}_std"]) for m in metrics]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    imgs = "".join(
        f'<figure><img alt="{f.stem}" src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">'
        f"<figcaption>{f.stem}</figcaption></figure>" for f in figures
    )
    fails = "".join(f"<li><code>{html.escape(str(p))}</code>: {html.escape((p / 'error.txt').read_text().strip())}</li>"
                    for p in failed)
    write_text_atomic(path, f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}th{{background:#eee}}img{{max-width:100%}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>{n_runs} runs; mean ± std over seeds (std with n−1; 0 for a single seed).</p>
<table><tr>{head}</tr>{''.join(body)}</table>
{f'<h2>Failed runs</h2><ul>{fails}</ul>' if fails else ''}
<h2>Figures</h2>{imgs}
<details><summary>Markdown table</summary><pre>{html.escape(summary_md)}</pre></details>
</body></html>
""")


def compare(paths: list[Path], out: Path | None = None) -> dict:
    """Write the comparison of the runs under ``paths`` into ``out``; returns the written paths."""
    paths = [Path(p) for p in paths]
    run_dirs, failed = find_runs(paths)
    runs = [load_run(r) for r in run_dirs]
    if out is None:
        out = paths[0] / "compare" if len(paths) == 1 and not (paths[0] / "metrics.json").exists() else Path("compare")
    out.mkdir(parents=True, exist_ok=True)
    per_run, summary, ablations, metrics = tables(runs)
    for name, table in (("runs.csv", per_run), ("summary.csv", summary)):
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False)
    md = markdown(summary, ablations, metrics)
    write_text_atomic(out / "summary.md", md)
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    figures = [f for f in (
        fsc_figure(fig_dir / "fsc_curves.png", runs, per_run, ablations),
        bar_figure(fig_dir / "bars.png", summary, ablations),
        ari_vs_k_figure(fig_dir / "ari_vs_k.png", per_run, runs),
    ) if f is not None]
    title = "cryobench_lab comparison: " + ", ".join(p.name for p in paths)
    html_report(out / "report.html", title, md, summary, ablations, metrics, figures, failed, len(runs))
    return {"summary_csv": out / "summary.csv", "summary_md": out / "summary.md", "runs_csv": out / "runs.csv",
            "report": out / "report.html", "figures": figures, "failed": failed, "n_runs": len(runs)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cryobench_lab.compare", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="a sweep folder, or run folders")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <sweep>/compare)")
    args = ap.parse_args(argv)
    try:
        written = compare(args.paths, args.out)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(written["summary_md"].read_text())
    print(f"{written['n_runs']} runs, {len(written['failed'])} failed; report: {written['report']}")


if __name__ == "__main__":
    main()
