"""Offline W&B runs from a sweep: one W&B run per job, identical summary keys and config fields, the study's
group and tags (so grouping by method/seed in a W&B workspace gives the compare table)."""

from __future__ import annotations

import sys

import pytest

from cryobench_lab.wandb_tools import _records, offline_run


def _flat_keys(tree, prefix=""):
    if isinstance(tree, dict):
        return {k for key, sub in tree.items() for k in _flat_keys(sub, f"{prefix}{key}.")}
    return {prefix[:-1]}


@pytest.mark.timeout(600)
def test_offline_wandb_runs_of_a_sweep_carry_identical_keys(tiny_dataset, tmp_path, monkeypatch):
    from cryobench_lab.__main__ import _app

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("CRYOBENCH_SWEEPS", str(tmp_path / "sweeps"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    tiny = tiny_dataset
    monkeypatch.setattr(sys, "argv", [
        "cryobench_lab", "-m", "+sweep=segmentation_ablation", "+size=tiny", "model=backproject",
        "model.wiener=constant,fsc", "model.use_labels=true,false", "seed=0", "data=custom", "data.snr=0.1",
        f"data.particles={tiny / 'particles.star'}", f"data.labels={tiny / 'labels.npy'}",
        f"data.gt_volumes={tiny / 'gt_volumes'}", "logger.backends=[wandb,csv]",
    ])
    _app()
    runs = sorted((tmp_path / "sweeps" / "segmentation_ablation").glob("*/wandb/offline-run-*"))
    assert len(runs) == 4  # one W&B run per job, none reused
    read = [offline_run(r) for r in runs]
    keys = [set(r["summary"]) for r in read]
    assert all(k == keys[0] for k in keys), [k ^ keys[0] for k in keys]
    assert {"val/fsc_auc_mean", "val/fsc_res_0.5", "val/ari", "train/wall_time_s", "train/images_per_s"} <= keys[0]
    configs = [_flat_keys(r["config"]) for r in read]
    assert all(c == configs[0] for c in configs) and {"model.name", "seed", "data.name"} <= configs[0]
    assert {r["group"] for r in read} == {"segmentation_ablation"}
    assert all("study:segmentation_ablation" in r["tags"] for r in read)
    assert {(r["config"]["model"]["wiener"], r["config"]["model"]["use_labels"]) for r in read} == {
        ("constant", True), ("constant", False), ("fsc", True), ("fsc", False)}


def test_wandb_log_reader_joins_records_across_blocks(tmp_path):
    """The .wandb reader on a hand-made log: a record split over two 32 KiB blocks, padding, a full record."""
    import zlib

    def header(payload, kind):
        return zlib.crc32(payload).to_bytes(4, "little") + len(payload).to_bytes(2, "little") + bytes([kind])

    big = bytes(range(256)) * 200  # 51,200 bytes: first + last
    first = big[: 32768 - 7 - 7]
    data = b":W&B\xe1\xbe\x00" + header(first, 2) + first
    rest = big[len(first):]
    data += header(rest, 4) + rest
    small = b"hello"
    data += header(small, 1) + small
    (tmp_path / "run-x.wandb").write_bytes(data)
    assert list(_records(tmp_path / "run-x.wandb")) == [big, small]
