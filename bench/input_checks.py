"""Reliability table of issue 26 (items 2, 3, 4, 6): what the entry point does with each bad input.

Each case is a variant of one small simulated dataset (AdK preset, 12 states, so that ``vol_10`` sorts
before ``vol_2``); the oracle (``model=backproject``) is run on it through ``python -m cryobench_lab`` and
the exit code, the FSC-AUC and any error or warning line are recorded. ``--src`` chooses the code (e.g.
an export of an older commit) so the same cases can be run before and after a change::

    python bench/input_checks.py --out /tmp/input_checks [--src /path/to/other/src] [--cases "a;b"]

Writes ``<out>/results_<label>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = dict(n_states=12, box_size=32, n_particles=40, snr=0.1, seed=11)  # 480 images, not a reported set


def _dataset(out: Path) -> Path:
    from cryobench_lab.data.presets import ensure_dataset

    return Path(ensure_dataset("adk", cache_dir=out / "cache", overrides=RECIPE, progress=False))


def _fourier_pad(vol: np.ndarray, D: int) -> np.ndarray:
    """The same map sampled on a finer grid (box D, same field of view)."""
    from cryobench_lab.physics.fft import fourier_pad_3d

    return fourier_pad_3d(torch.from_numpy(vol), D).numpy()


def _write_volumes(folder: Path, src: Path, name, transform) -> str:
    """Each ground-truth state of ``src`` as ``folder/name(k)``, after ``transform(vol, apix) -> (vol, apix)``."""
    from cryobench_lab.io.mrc import read_mrc, write_mrc

    folder.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(sorted(src.glob("state_*.mrc"))):
        vol, apix = read_mrc(f)
        vol, apix = transform(vol, apix)
        write_mrc(folder / name(k), vol, apix)
    return str(folder)


def _star(out: Path, data: Path, rot=None, ctf=None, drop_ctf=False) -> str:
    """The dataset's star with other rotations or CTF rows (or no CTF columns)."""
    from cryobench_lab.io.particles import load_particles
    from cryobench_lab.io.star import read_star, write_particle_star, write_star

    if drop_ctf:
        df = read_star(data / "particles.star")
        cols = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
                "rlnAmplitudeContrast", "rlnPhaseShift"]
        write_star(out, df.drop(columns=[c for c in cols if c in df.columns]))
        return str(out)
    meta = load_particles(data / "particles.star")
    names = [f"{i + 1}@particles.mrcs" for i in range(meta.n)]
    write_particle_star(out, names, meta.rot if rot is None else rot(meta.rot), meta.trans_px,
                        meta.ctf if ctf is None else ctf(meta.ctf.copy()), apix=meta.apix, D=meta.D)
    return str(out)


def _um(ctf):
    ctf[:, 2:4] /= 1e4
    return ctf


def cases(inp: Path, data: Path) -> dict:
    """{name: (expected behaviour, extra overrides)}; files are written under ``inp``."""
    gt = data / "gt_volumes"
    n = len(list(gt.glob("state_*.mrc")))
    same = lambda v, a: (v, a)  # noqa: E731

    def padded(factor):  # the same voxels in a larger box: a larger field of view
        def pad(v, a):
            return np.pad(v, (v.shape[0] * (factor - 2) // 4,) * 2), a
        return pad

    def mixed(k):
        return f"vol_{k}.mrc" if k % 2 else f"state_{k}.mrc"

    rng = np.random.default_rng(0)
    return {
        "correct": ("runs, no warning", {}),
        "2 names vol_0..vol_11": ("numeric pairing, same AUC as correct",
                                  {"data.gt_volumes": _write_volumes(inp / "unpadded", gt, "vol_{}.mrc".format, same)}),
        "2 two name patterns": ("refused, naming the folder",
                                {"data.gt_volumes": _write_volumes(inp / "mixed", gt, mixed, same)}),
        "3 2D px at the particles' apix": ("refused, naming the file", {"data.gt_volumes": _write_volumes(
            inp / "pad_2d", gt, "state_{:03d}.mrc".format, padded(4))}),
        "3 zero-padded into 1.5 D px": ("refused, naming the file", {"data.gt_volumes": _write_volumes(
            inp / "pad_zero", gt, "state_{:03d}.mrc".format, padded(3))}),
        "3 cropped to 0.75 D px": ("refused before training, naming the file", {"data.gt_volumes": _write_volumes(
            inp / "crop", gt, "state_{:03d}.mrc".format,
            lambda v, a: (np.ascontiguousarray(v[4:-4, 4:-4, 4:-4]), a))}),
        "3 2D px at apix/2 (same field of view)": ("resampled, same AUC as correct", {"data.gt_volumes": _write_volumes(
            inp / "fine", gt, "state_{:03d}.mrc".format, lambda v, a: (_fourier_pad(v, 2 * v.shape[0]), a / 2))}),
        "3 no voxel size in header, same box": ("runs, one warning", {"data.gt_volumes": _write_volumes(
            inp / "novoxel", gt, "state_{:03d}.mrc".format, lambda v, a: (v, 0.0))}),
        "4 star without CTF columns": ("refused, asks for data.ctf=none",
                                       {"data.particles": _star(inp / "noctf.star", data, drop_ctf=True)}),
        "4 same, data.ctf=none": ("runs (the user's explicit choice)",
                                  {"data.particles": str(inp / "noctf.star"), "data.ctf": "none"}),
        "6 defocus in µm": ("runs, one warning (defocus)", {"data.particles": _star(inp / "um.star", data, ctf=_um)}),
        "6 transposed rotations": ("runs, one warning (poses)", {"data.particles": _star(
            inp / "transposed.star", data, rot=lambda r: np.ascontiguousarray(np.swapaxes(r, 1, 2)))}),
        "6 shuffled rotations": ("runs, one warning (poses)", {"data.particles": _star(
            inp / "shuffled.star", data, rot=lambda r: r[rng.permutation(len(r))])}),
    } if n else {}


def run_case(out: Path, data: Path, name: str, overrides: dict, src: Path, label: str) -> dict:
    run_dir = out / f"runs_{label}" / re.sub(r"[^A-Za-z0-9.]+", "_", name)  # a quote would break Hydra's parser
    shutil.rmtree(run_dir, ignore_errors=True)
    args = {"model": "backproject", "data": "custom", "data.particles": str(data / "particles.star"),
            "data.labels": str(data / "labels.npy"), "data.gt_volumes": str(data / "gt_volumes"),
            "data.datadir": str(data), "logger": "csv", "metrics": "fast", "trainer.enable_progress_bar": "false",
            **overrides, "hydra.run.dir": str(run_dir)}
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "cryobench_lab", *[f"{k}={v}" for k, v in args.items()]],
                          cwd=out, env=env, capture_output=True, text=True, timeout=1800)
    metrics = run_dir / "metrics.json"
    auc = json.loads(metrics.read_text()).get("val/fsc_auc_mean") if metrics.is_file() else None
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] if proc.returncode and not errors else []
    warnings = [line.split("[WARNING] - ", 1)[1] for line in proc.stdout.splitlines() if "[WARNING] - " in line]
    provenance = run_dir / "provenance.json"
    pairing = json.loads(provenance.read_text()).get("ground_truth_pairing") if provenance.is_file() else None
    return {"case": name, "exit": proc.returncode, "fsc_auc_mean": auc, "error": (errors or tail or [None])[0],
            "warnings": warnings, "run_folder_left": run_dir.exists(),
            "pairing_state_2": (pairing or {}).get("volumes", {}).get("2")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the cryobench_lab source tree to run")
    ap.add_argument("--label", default="after")
    ap.add_argument("--cases", default="", help="case names separated by ; (default: all)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    data = _dataset(a.out)
    table = cases(a.out / f"inputs_{a.label}", data)  # one folder per label: runs of both may overlap
    wanted = [c for c in a.cases.split(";") if c] or list(table)
    rows = []
    for name in wanted:
        expected, overrides = table[name]
        row = {**run_case(a.out, data, name, overrides, a.src.resolve(), a.label), "expected": expected}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    (a.out / f"results_{a.label}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    print("\n| case | expected | exit | FSC-AUC | error / warning |\n|---|---|---|---|---|")
    for r in rows:
        auc = f"{r['fsc_auc_mean']:.3f}" if r["fsc_auc_mean"] is not None else "–"
        said = r["error"] or "; ".join(r["warnings"]) or "(nothing)"
        print(f"| {r['case']} | {r['expected']} | {r['exit']} | {auc} | {said[:160]} |")


if __name__ == "__main__":
    main()
