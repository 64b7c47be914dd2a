"""Columns of the compare table in words: each metric key's label with its unit, which metrics to show, and
which differences between runs' data deserve a warning (compare.py writes the table and report)."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: metrics shown first (then every other scalar ``val/*`` key, alphabetically), and their labels in words
PRIORITY = {
    "val/fsc_auc_mean": "FSC-AUC per state, mean (area under FSC vs cycles/px)",
    "val/floor_fsc_auc_mean": "floor: consensus of all images, FSC-AUC per state, mean (a method must beat it)",
    "val/oracle_fsc_auc_mean": "oracle given the truth, FSC-AUC per state, mean",
    "val/fsc_auc_mean_gtmask": "FSC-AUC per state, mean, under the ground-truth-support mask",
    "val/fsc_res_0.5": "resolution at FSC 0.5, mean over states (Å)",
    "val/fsc_res_0.143": "resolution at FSC 0.143, mean over states (Å)",
    "val/fsc_image_auc_mean": "FSC-AUC per image, mean (area under absolute FSC vs cycles/px)",
    "val/ari": "classes vs states: adjusted Rand index",
    "val/nmi": "classes vs states: normalised mutual information",
    "val/segmentation_ari": "segments vs domains: adjusted Rand index",
    "val/part_ari": "parts vs chains/domains: adjusted Rand index",
    "val/clashes_median": "Cα clashes per predicted model, median (count)",
    "val/clashes_mean": "Cα clashes per predicted model, mean (count)",
    "train/wall_time_s": "training wall time (s)",
    "train/images_per_s": "training throughput (images/s)",
}
#: labels of the other keys a run may report (``column_label`` adds ``dist_corr_*`` and ``*_masked``)
LABELS = {
    "val/fsc_auc_std": "FSC-AUC per state, std over states",
    "val/fsc_auc_median": "FSC-AUC per state, median",
    "val/fsc_image_auc_std": "FSC-AUC per image, std over images",
    "val/fsc_image_auc_median": "FSC-AUC per image, median",
    "val/n_empty_classes": "empty classes (count)",
    "val/class_sizes": "images per class (list of counts)",
    "val/distance_corr": "domain distances predicted vs true: Pearson r, mean over pairs",
    "val/clashes_true_median": "Cα clashes per true model, median (count; the floor)",
    "val/rot_error_median": "rotation error, median (°)",
    "val/shift_error_median": "shift error, median (px)",
    "val/anchor_ari": "anchors vs chains/domains: adjusted Rand index",
    "val/coappearance_ari": "co-appearing parts vs chains/domains: adjusted Rand index",
    "val/n_parts": "parts found (count)",
    "val/gate_absent_max": "largest gate of an absent chain (0–1)",
    "val/gate_present_min": "smallest gate of a present chain (0–1)",
    "train/skipped_steps": "skipped non-finite steps (count)",
}
#: scalar keys that describe a run rather than measure it (``n_particles``: the name before n_particles_total)
DESCRIPTIVE = {"seed", "n_particles", "n_particles_total", "box_size", "apix", "train/epochs",
               "train/skipped_steps", "config_hash"}
#: what a run's data are described by (metrics.json key → words), compared between runs of one dataset
DATA_FACTS = {"n_particles_total": "images (all states)", "box_size": "box size (px)", "apix": "pixel size (Å)"}
#: table columns that are not metrics, in words
COLUMN_WORDS = {"n_seeds": "seeds (runs)", "data.n_images": "images (all states)",
                "data.n_particles": "images per state (data.n_particles)", "data.snr": "SNR (data.snr)"}


def column_label(key: str) -> str:
    """A metric key in words with its unit (the key itself only when nothing is known about it)."""
    if key.endswith("_masked"):
        return column_label(key.removesuffix("_masked")) + ", under the dataset's mask"
    if key.endswith("_gtmask") and key not in PRIORITY:
        return column_label(key.removesuffix("_gtmask")) + ", under the ground-truth-support mask"
    for prefix, words in (("val/floor_", "floor (consensus of all images): "), ("val/oracle_", "oracle given the truth: ")):
        if key.startswith(prefix):
            return words + column_label("val/" + key.removeprefix(prefix))
    if key in PRIORITY or key in LABELS:
        return PRIORITY.get(key) or LABELS[key]
    name = key.removeprefix("val/")
    if name.startswith("dist_corr_"):
        a, _, b = name.removeprefix("dist_corr_").rpartition("_")
        return f"distance {a}–{b} predicted vs true: Pearson r"
    return name


def data_warnings(runs: list[dict]) -> list[str]:
    """One line per dataset whose runs differ in their data (image count, box size, pixel size): their
    numbers are then not comparable as equals."""
    out = []
    for dataset in sorted({r["dataset"] for r in runs}):
        group = [r for r in runs if r["dataset"] == dataset]
        diffs = []
        for key, words in DATA_FACTS.items():
            values = sorted({r["data"].get(key) for r in group if r["data"].get(key) is not None}, key=float)
            if len(values) > 1:
                diffs.append(f"{words} {' vs '.join(f'{v:g}' for v in values)}")
        if diffs:
            out.append(f"runs of dataset {dataset} differ in their data: {'; '.join(diffs)}; compare such numbers "
                       "with care (the table has a column per fact that varies)")
    return out


def shown_metrics(summary: pd.DataFrame, metrics: list[str]) -> tuple[list[str], list[str]]:
    """(metrics with a number in some row, metrics NaN in every row): the table and report show the first;
    the CSV files keep every key."""
    def measured(m: str) -> bool:
        return f"{m}_mean" in summary and bool(np.isfinite(summary[f"{m}_mean"].to_numpy(dtype=float)).any())

    return [m for m in metrics if measured(m)], [m for m in metrics if not measured(m)]
