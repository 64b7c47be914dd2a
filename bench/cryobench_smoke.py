"""Acceptance run of issue 11: a CryoBench-layout replica, every method through experiment=cryobench +smoke=true,
and the leaderboard table.

    python bench/cryobench_smoke.py [--work /tmp/cryobench_smoke] [--methods backproject cryodrgn ...]

Runs that finished in an earlier invocation with the same --work folder are reused, not re-run.

1. Simulates the ``adk`` preset (10 states x 100 images, D=64, SNR 0.1) straight into CryoBench's download layout
   (``python -m cryobench_lab.simulate --layout cryobench``).
2. Runs ``python -m cryobench_lab experiment=cryobench data=cryobench_igg1d model=<method> +smoke=true
   data.root=<replica>`` for every method (segvae: model=segvae_paper with the replica's state-0 atomic model;
   focused with the whole-particle mask), backproject through three other dataset configs and drgnai through
   spikemd (per-image FSC only; its oracle would need one volume per image).
3. Writes the leaderboard (Markdown + CSV) and the raw numbers (JSON) to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["backproject", "cryodrgn", "drgnai", "hydra", "classify3d", "segvae", "partgmm", "multiclass", "focused"]
OTHER_DATASETS = ["iggrl", "ribosembly", "tomotwin100"]
MODEL_OF_METHOD = {"segvae": "segvae_paper"}  # CryoBench's segvae rows run the cryoSPHERE paper's settings


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/cryobench_smoke")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    args = ap.parse_args()
    work = Path(args.work)
    root = work / "replica"
    py = sys.executable
    if not (root / "replica.json").is_file():
        subprocess.run([py, "-m", "cryobench_lab.simulate", "--preset", "adk", "--n-particles", "100", "--box-size", "64",
                        "--out", str(root), "--layout", "cryobench", "--quiet"], check=True)
    jobs = [("igg1d", m) for m in args.methods] + [(d, "backproject") for d in OTHER_DATASETS]
    jobs.append(("spikemd", "drgnai"))
    results = []
    for dataset, method in jobs:
        run_dir = work / "runs" / f"{dataset}_{method}"
        cmd = [py, "-m", "cryobench_lab", "experiment=cryobench", f"data=cryobench_{dataset}",
               f"model={MODEL_OF_METHOD.get(method, method)}", "+smoke=true", f"data.root={root}", "data.snr=null",
               f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
        if method == "segvae":
            cmd.append(f"model.structure={root / 'replica_structures' / 'state_000.cif'}")
        if method == "focused":  # the replica has no region of interest: the whole-particle mask (nothing subtracted)
            cmd.append(f"model.mask={root / 'init_mask' / 'mask.mrc'}")
        timing = run_dir / "bench_seconds.json"
        if (run_dir / "metrics.json").is_file() and timing.is_file():  # finished by an earlier invocation
            entry = json.loads(timing.read_text())
            entry.update({k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
            results.append(entry)
            continue
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # a failed run is recorded, not fatal
        seconds = time.time() - t0
        ok = proc.returncode == 0 and (run_dir / "metrics.json").is_file()
        entry = {"dataset": dataset, "method": method, "ok": ok, "seconds": round(seconds, 1), "command": " ".join(cmd[1:])}
        if ok:
            timing.write_text(json.dumps(entry))
            m = json.loads((run_dir / "metrics.json").read_text())
            entry.update({k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        else:
            entry["stderr_tail"] = proc.stderr[-2000:]
        results.append(entry)
        print(f"{dataset:12s} {method:12s} ok={ok} {seconds:6.1f}s auc={entry.get('val/fsc_auc_mean')}", flush=True)
    from cryobench_lab.leaderboard import write_leaderboard

    done = [work / "runs" / f"{r['dataset']}_{r['method']}" for r in results if r["ok"]]
    out = REPO / "bench" / "results"
    write_leaderboard(done, out / "cryobench_leaderboard_smoke.md", out / "cryobench_leaderboard_smoke.csv")
    load = os.getloadavg()
    (out / "cryobench_smoke.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": "2 CPU cores, shared with other sessions",
        "loadavg": load, "replica": str(root), "runs": results}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
