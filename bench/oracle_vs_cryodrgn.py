"""The backprojection oracle against cryoDRGN's `backproject_voxel`, side by side on the same images.

For each preset dataset (default: tomotwin3 and adk at their defaults, D=64, SNR 0.1) it runs
`python -m cryobench_lab model=backproject data=<preset>` and, for every ground-truth state,
`cryodrgn backproject_voxel` on that state's particles (same stack, poses and CTF pickles, `--ind`), then
scores both volumes against the state's ground truth with the project's FSC (metrics/fsc.py, CryoBench
definitions). cryoDRGN must be installed in a bench-only environment (it is GPL and not a dependency):

    python3 -m venv .venv-cryodrgn && .venv-cryodrgn/bin/pip install torch==2.13.0 cryodrgn==4.3.1
    .venv/bin/python bench/oracle_vs_cryodrgn.py [--presets tomotwin3 adk] [--cryodrgn .venv-cryodrgn/bin/cryodrgn]

Prints a Markdown table and writes bench/results/oracle_vs_cryodrgn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cryobench_lab.data.presets import ensure_dataset
from cryobench_lab.io.mrc import read_mrc
from cryobench_lab.io.pickles import save_pickle
from cryobench_lab.metrics.fsc import fsc_summary

REPO = Path(__file__).resolve().parents[1]


def run_oracle(preset: str, out: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cryobench_lab", "model=backproject", f"data={preset}", "logger=none",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"],
        check=True, env=dict(os.environ, WANDB_MODE="disabled"),
    )
    wall = time.perf_counter() - t0
    return json.loads((out / "metrics.json").read_text()), wall


def run_cryodrgn(cryodrgn: str, folder: Path, labels: np.ndarray, work: Path) -> tuple[list[dict], float]:
    rows, wall = [], 0.0
    for s in range(int(labels.max()) + 1):
        ind = work / f"ind_{s}.pkl"
        save_pickle(ind, np.nonzero(labels == s)[0].astype(np.int64))
        out = work / f"cryodrgn_{s}"
        t0 = time.perf_counter()
        subprocess.run(
            [cryodrgn, "backproject_voxel", str(folder / "particles.mrcs"), "--poses", str(folder / "poses.pkl"),
             "--ctf", str(folder / "ctf.pkl"), "--ind", str(ind), "-o", str(out), "--no-half-maps"],
            check=True, capture_output=True,
        )
        wall += time.perf_counter() - t0
        vol, _ = read_mrc(out / "backproject.mrc")
        gt, apix = read_mrc(folder / "gt_volumes" / f"state_{s:03d}.mrc")
        rows.append({"state": s, **fsc_summary(vol, gt, apix=apix)})
    return rows, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tomotwin3", "adk"])
    ap.add_argument("--cryodrgn", default=str(REPO / ".venv-cryodrgn" / "bin" / "cryodrgn"))
    args = ap.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    print("| dataset | state | oracle FSC-AUC | cryoDRGN backproject_voxel FSC-AUC | oracle res@0.5 (Å) | cryoDRGN res@0.5 (Å) |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        folder = Path(ensure_dataset(preset))
        labels = np.load(folder / "labels.npy")
        with tempfile.TemporaryDirectory() as tmp:
            ours, ours_wall = run_oracle(preset, Path(tmp) / "oracle")
            peer, peer_wall = run_cryodrgn(args.cryodrgn, folder, labels, Path(tmp))
        for mine, theirs in zip(ours["val/per_state"], peer):
            print(f"| {preset} | {mine['state']} | {mine['auc']:.4f} | {theirs['auc']:.4f} | "
                  f"{mine['res_0.5']:.1f} | {theirs['res_0.5']:.1f} |")
        ours_auc = [r["auc"] for r in ours["val/per_state"]]
        peer_auc = [r["auc"] for r in peer]
        print(f"| {preset} | mean | {np.mean(ours_auc):.4f} | {np.mean(peer_auc):.4f} | | |")
        results[preset] = {
            "dataset": str(folder), "oracle_auc": ours_auc, "cryodrgn_auc": peer_auc,
            "oracle_res_0.5": [r["res_0.5"] for r in ours["val/per_state"]],
            "cryodrgn_res_0.5": [r["res_0.5"] for r in peer],
            "oracle_wall_s": ours_wall, "cryodrgn_wall_s": peer_wall,
        }
    out = REPO / "bench" / "results" / "oracle_vs_cryodrgn.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
