"""The segment VAE (model=segvae) against cryoDRGN `train_vae` on the same images (issue 5 acceptance).

Same adk images (the preset at D=64), same known poses and CTF, same scorer: the mean per-conformation
FSC-AUC of metrics/protocols.py (cryoDRGN volumes from `cryodrgn eval_vol` at each state's representative
latent, bench/mixture_speed.py :func:`cryodrgn_quality`; ours from ``python -m cryobench_lab`` ``metrics.json``).
cryoDRGN is GPL and runs as a separate program from its bench-only environment (.venv-cryodrgn, see
bench/mixture_speed.py); its networks are set to ours' size (3 hidden layers of 256 in encoder and
decoder, z = 8), everything else at its defaults.

    .venv/bin/python bench/segvae_vs_cryodrgn.py [--cryodrgn-epochs 20] [--ours-run <run folder>]

``--cryodrgn-out`` keeps (or reuses) cryoDRGN's output; ``--ours-run`` scores an existing
``model=segvae data=adk`` run instead of training one. Writes bench/results/segvae_vs_cryodrgn.json with
both rows, the wall times and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixture_speed import cryodrgn_quality  # bench helper: train_vae + eval_vol + our scorer)


def ours(run: Path | None, work: Path) -> dict:
    if run is None:
        run = work / "segvae"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cryobench_lab", "model=segvae", "data=adk", "logger=csv",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], check=True, cwd=REPO)
        wall = time.perf_counter() - t0
    else:
        wall = None
    m = json.loads((run / "metrics.json").read_text())
    keys = ("val/fsc_auc_mean", "val/dist_corr_LID_CORE", "val/dist_corr_NMP_CORE", "val/clashes_median",
            "val/segmentation_ari", "train/wall_time_s", "train/epochs")
    return {"method": "segvae (model=segvae data=adk)", "run": str(run), "process_wall_s": wall,
            **{k.split("/", 1)[1]: m.get(k) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cryodrgn", default=str(REPO / ".venv-cryodrgn" / "bin" / "cryodrgn"))
    ap.add_argument("--cryodrgn-epochs", type=int, default=20)
    ap.add_argument("--ours-run", type=Path, default=None)
    ap.add_argument("--cryodrgn-out", type=Path, help="train_vae output folder to reuse (trained if empty)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "segvae_vs_cryodrgn.json")
    args = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_start": os.getloadavg()[0],
              "machine": f"{os.cpu_count()} CPU cores, shared"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["cryodrgn"] = cryodrgn_quality("adk", args.cryodrgn, args.cryodrgn_epochs,
                                              args.cryodrgn_out or work / "cryodrgn")
        result["ours"] = ours(args.ours_run, work)
    result["load_average_at_end"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    o, c = result["ours"], result["cryodrgn"]
    print(f"| method | FSC-AUC mean | training s |\n|---|---|---|\n| {o['method']} | {o['fsc_auc_mean']:.4f} | "
          f"{o['wall_time_s']:.0f} |\n| {c['method']} | {c['fsc_auc_mean']:.4f} | {c['train_s']:.0f} |")


if __name__ == "__main__":
    main()
