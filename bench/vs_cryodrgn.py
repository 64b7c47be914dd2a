"""One of our models against cryoDRGN `train_vae` on the same images (issues 5 and 6 acceptance).

Same images (a preset at D=64), same known poses and CTF, same scorer: the mean per-conformation FSC-AUC
of metrics/protocols.py (cryoDRGN volumes from `cryodrgn eval_vol` at each state's representative latent,
bench/mixture_speed.py :func:`cryodrgn_quality`; ours from ``python -m cryobench_lab`` ``metrics.json``).
cryoDRGN is GPL and runs as a separate program from its bench-only environment (.venv-cryodrgn, see
bench/mixture_speed.py); its networks are set to ours' size (3 hidden layers of 256 in encoder and
decoder, z = 8), everything else at its defaults.

    .venv/bin/python bench/vs_cryodrgn.py [--model segvae --data adk] [--cryodrgn-epochs 20] [--ours-run <run folder>]
    .venv/bin/python bench/vs_cryodrgn.py --model partgmm --data assembly

``--cryodrgn-out`` keeps (or reuses) cryoDRGN's output; ``--ours-run`` scores an existing
``model=<model> data=<data>`` run instead of training one. Writes bench/results/<model>_vs_cryodrgn_<data>.json
with both rows, the wall times and the load average.
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

from mixture_speed import cryodrgn_quality  # bench helper: train_vae + eval_vol + our scorer)  # noqa: E402


# metrics.json keys reported when the run has them (val/fsc_auc_mean always)
KEYS = ("val/fsc_auc_mean", "val/dist_corr_LID_CORE", "val/dist_corr_NMP_CORE", "val/clashes_median",
        "val/segmentation_ari", "train/wall_time_s", "train/epochs")


def ours(model: str, data: str, run: Path | None, work: Path) -> dict:
    if run is None:
        run = work / model
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cryobench_lab", f"model={model}", f"data={data}", "logger=csv",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], check=True, cwd=REPO)
        wall = time.perf_counter() - t0
    else:
        wall = None
    m = json.loads((run / "metrics.json").read_text())
    return {"method": f"{model} (model={model} data={data})", "run": str(run), "process_wall_s": wall,
            **{k.split("/", 1)[1]: m[k] for k in KEYS if k in m}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="segvae")
    ap.add_argument("--data", default="adk", help="a preset (conf/data) simulated by this package")
    ap.add_argument("--cryodrgn", default=str(REPO / ".venv-cryodrgn" / "bin" / "cryodrgn"))
    ap.add_argument("--cryodrgn-epochs", type=int, default=20)
    ap.add_argument("--ours-run", type=Path, default=None)
    ap.add_argument("--cryodrgn-out", type=Path, help="train_vae output folder to reuse (trained if empty)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or REPO / "bench" / "results" / f"{args.model}_vs_cryodrgn_{args.data}.json"
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_at_start": os.getloadavg()[0],
              "machine": f"{os.cpu_count()} CPU cores, shared"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["cryodrgn"] = cryodrgn_quality(args.data, args.cryodrgn, args.cryodrgn_epochs,
                                              args.cryodrgn_out or work / "cryodrgn")
        result["ours"] = ours(args.model, args.data, args.ours_run, work)
    result["load_average_at_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(result, indent=1) + "\n")
    o, c = result["ours"], result["cryodrgn"]
    print(f"| method | FSC-AUC mean | training s |\n|---|---|---|\n| {o['method']} | {o['fsc_auc_mean']:.4f} | "
          f"{o.get('wall_time_s', float('nan')):.0f} |\n| {c['method']} | {c['fsc_auc_mean']:.4f} | {c['train_s']:.0f} |")


if __name__ == "__main__":
    main()
