"""The compare table and report (issue 28 item 6): all-NaN metrics left out (the CSV keeps every key), every
column labelled in words with its unit, and a warning when runs of one dataset differ in their data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from cryobench_lab.compare import column_label, compare
from cryobench_lab.metrics.protocols import METRIC_KEYS


def _run(folder: Path, method: str, seed: int, n_images: int, auc: float) -> None:
    """A finished run as on a dataset without atomic models: every atom key NaN, like metrics.json has them."""
    folder.mkdir(parents=True)
    metrics = {"dataset": "toy", "seed": seed, "method": method, "apix": 2.0, "box_size": 32,
               "n_particles_total": n_images, "train/wall_time_s": 10.0, "train/images_per_s": 100.0}
    for key in METRIC_KEYS:
        name = key.replace("<a>_<b>", "LID_CORE")
        metrics[f"val/{name}"] = math.nan if "fsc" not in key and key != "ari" else auc
    metrics.pop("val/class_sizes")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    cfg = {"data": {"name": "toy", "n_particles": n_images // 3}, "model": {"name": method}, "seed": seed}
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")


def test_table_drops_all_nan_columns_labels_in_words_and_warns_on_data(tmp_path, capsys):
    study = tmp_path / "study"
    _run(study / "a", "hydra", 0, 3000, 0.30)
    _run(study / "b", "hydra", 1, 900, 0.32)
    out = compare([study])
    err = capsys.readouterr().err
    assert "warning: runs of dataset toy differ in their data: images (all states) 900 vs 3000" in err
    md = out["summary_md"].read_text()
    assert md.startswith("> warning: runs of dataset toy differ") and "900 vs 3000" in out["report"].read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert all(any(r[i] != "–" for r in rows) for i in range(len(header)))  # no all-NaN column
    assert "clashes_median" in md.split("Not measured in any run")[1]  # dropped columns are named
    assert "images (all states)" in header and "images per state (data.n_particles)" in header
    # every metric column in words: a space, and a unit or a named statistic
    metric_cols = header[header.index("seeds (runs)") + 1:]
    assert metric_cols and all(" " in c and "_" not in c for c in metric_cols), metric_cols  # no raw keys
    assert "resolution at FSC 0.143, mean over states (Å)" in header
    report = out["report"].read_text()
    assert "<th>classes vs states: adjusted Rand index</th>" in report and "clashes per predicted" not in report
    csv = pd.read_csv(out["summary_csv"])  # the CSV keeps every key, NaN included
    assert "val/clashes_median_mean" in csv and csv["val/clashes_median_mean"].isna().all()


def test_every_metric_key_has_a_label_in_words():
    for key in METRIC_KEYS:
        name = "val/" + key.replace("<a>_<b>", "LID_CORE")
        label = column_label(name)
        assert label != name.removeprefix("val/") and " " in label, (key, label)
    assert column_label("val/dist_corr_LID_CORE") == "distance LID–CORE predicted vs true: Pearson r"
    assert column_label("val/fsc_res_0.5_masked").endswith("under the dataset's mask")


def test_same_data_no_warning(tmp_path, capsys):
    _run(tmp_path / "s" / "a", "hydra", 0, 900, 0.3)
    _run(tmp_path / "s" / "b", "hydra", 1, 900, 0.3)
    assert compare([tmp_path / "s"])["warnings"] == [] and "warning" not in capsys.readouterr().err
