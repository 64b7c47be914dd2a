"""Acceptance runs of the discrete baselines (issue 7): multiclass EM and focused classification.

    python bench/discrete_baselines.py NAME OUT_DIR [hydra overrides ...]

Composes conf/train.yaml with the overrides, trains and scores through ``cryobench_lab.run.run`` (the same
path as ``python -m cryobench_lab``), and writes ``bench/results/discrete_<NAME>.json`` with the overrides,
the scalar metrics, the confusion matrix, the EM log-likelihood trace, wall time and the load average.

The shared scorer's atom metrics are skipped: they need atomic models with the same residues in every state,
which compositional datasets (tomotwin3, assembly) do not have, and these baselines have no atoms.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from cryobench_lab.callbacks import evaluation
from cryobench_lab.cli import CONF_DIR
from cryobench_lab.config import register_configs
from cryobench_lab.run import run

RESULTS = Path(__file__).resolve().parent / "results"


def main(name: str, out_dir: str, overrides: list[str]) -> dict:
    if hasattr(evaluation, "atom_scores"):
        evaluation.atom_scores = lambda *args, **kwargs: {}
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"output_dir={out_dir}", "logger=none"])
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    metrics = run(cfg)
    wall = time.perf_counter() - t0
    trace_file = Path(out_dir) / "classes" / "log_likelihood.json"
    sizes_file = Path(out_dir) / "classes" / "class_sizes.json"
    result = {
        "name": name,
        "command": f"python bench/discrete_baselines.py {name} {out_dir} " + " ".join(overrides),
        "overrides": overrides,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, shared with other sessions",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_time_s": wall,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "confusion": metrics.get("val/confusion"),
        "class_sizes": json.loads(sizes_file.read_text()) if sizes_file.exists() else None,
        "log_likelihood": json.loads(trace_file.read_text())["log_likelihood"] if trace_file.exists() else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"discrete_{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("name", "wall_time_s")} | {
        k: result["metrics"].get(k) for k in ("val/ari", "val/fsc_auc_mean")}))
    return result


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
