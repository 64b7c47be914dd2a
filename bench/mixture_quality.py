"""Quality of cryoDRGN `train_vae` against a finished `python -m cryobench_lab model=hydra` run, same images.

cryoDRGN (GPL) runs as a separate program from a bench-only environment (see bench/mixture_speed.py) with
our decoder's width and depth (3 residual hidden layers of 256, as its --dec-layers counts them; the
encoder the same), fixed poses and CTF, z dimension 8, its other defaults (batch 16, lr 1e-4,
β = 1/zdim, Gaussian positional encoding) for ``--epochs`` epochs: by default the same number of passes
over the data as our model's default. It writes weights and latents after every epoch, so a run cut short
is scored at its last finished epoch (``--epoch``; cryoDRGN 4 numbers weights.E.pkl from 1).

Scored with our metrics (metrics/protocols.py, metrics/classes.py):

- classes: k-means (K = number of ground-truth states, k-means++ seeding, 10 restarts) on its latents → ARI;
- per-conformation FSC-AUC, the protocol our runs are scored by (for each state, the image whose latent is
  nearest the state's mean latent is decoded with `cryodrgn eval_vol`);
- per-class FSC-AUC: the volume at each k-means centre, scored against the ground truth of the state most
  of its images belong to (a cluster claiming no state's majority is scored against its best match).

Ours: ``val/fsc_auc_mean``, ``val/ari`` and the per-state AUCs from the run's metrics.json (``--ours``).

    .venv/bin/python bench/mixture_quality.py --ours /tmp/mix/runs/hydra_t3 --cryodrgn-out /tmp/mix/cdrgn/t3 \
        [--train] [--epochs 8] [--epoch E]

Writes bench/results/mixture_quality.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixture_speed import CRYODRGN_NET, REPO, _cryodrgn_epoch_times, _run_measured, kmeans  # noqa: E402


def train(folder: Path, cryodrgn: str, epochs: int, out: Path) -> dict:
    proc, wall, rss = _run_measured([
        cryodrgn, "train_vae", str(folder / "particles.mrcs"), "--poses", str(folder / "poses.pkl"), "--ctf",
        str(folder / "ctf.pkl"), "--zdim", "8", *CRYODRGN_NET, "-n", str(epochs), "--no-analysis", "-o", str(out),
    ])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {"process_wall_s": wall, "peak_rss_mb": rss}


def score(folder: Path, cryodrgn: str, out: Path, epoch: int | None) -> dict:
    from cryobench_lab.io.mrc import read_mrc
    from cryobench_lab.io.pickles import load_pickle
    from cryobench_lab.metrics.classes import classification_metrics
    from cryobench_lab.metrics.fsc import fsc_summary
    from cryobench_lab.metrics.protocols import per_conformation_fsc

    if epoch is None:  # the last epoch whose weights were written (cryoDRGN 4 numbers them from 1)
        epoch = max(int(p.name.split(".")[1]) for p in out.glob("weights.*.pkl"))
    weights, zfile = out / f"weights.{epoch}.pkl", out / f"z.{epoch}.pkl"
    labels = np.load(folder / "labels.npy")
    apix = float(json.loads((folder / "meta.json").read_text())["apix"])
    z = np.asarray(load_pickle(zfile), dtype=np.float32)  # (N, 8)
    n_states = int(labels.max()) + 1
    clusters = kmeans(z, n_states)
    cls = classification_metrics(torch.as_tensor(clusters), torch.as_tensor(labels), n_states)
    gt = torch.stack([torch.from_numpy(np.ascontiguousarray(read_mrc(f)[0], dtype=np.float32))
                      for f in sorted((folder / "gt_volumes").glob("*.mrc"))])

    def decode(latent, classes=None):
        """Volumes (M, D, D, D) at latents (M, 8) from `cryodrgn eval_vol`."""
        with tempfile.TemporaryDirectory() as tmp:
            np.savetxt(Path(tmp) / "z.txt", np.atleast_2d(latent.numpy() if torch.is_tensor(latent) else latent))
            subprocess.run([cryodrgn, "eval_vol", str(weights), "-c", str(out / "config.yaml"), "--zfile",
                            str(Path(tmp) / "z.txt"), "-o", str(Path(tmp) / "vols"), "--Apix", str(apix)],
                           check=True, capture_output=True)
            files = sorted((Path(tmp) / "vols").glob("vol_*.mrc"))
            return torch.stack([torch.from_numpy(np.ascontiguousarray(read_mrc(f)[0], dtype=np.float32)) for f in files])

    conf = per_conformation_fsc(decode, torch.as_tensor(labels), torch.as_tensor(z), None, gt, apix, batch_size=64)
    # per-class volumes: each k-means centre, against the state most of the cluster's images belong to
    centres = np.stack([z[clusters == k].mean(0) for k in range(n_states)])
    vols = decode(centres)
    per_class = []
    for k in range(n_states):
        members = labels[clusters == k]
        majority = int(np.bincount(members, minlength=n_states).argmax())
        per_class.append({"cluster": k, "size": int(len(members)), "state": majority,
                          "auc": fsc_summary(vols[k], gt[majority], apix=apix)["auc"]})
    epoch_s = _cryodrgn_epoch_times(out / "run.log")
    return {"epochs_trained": epoch, "train_s": float(sum(epoch_s[:epoch])),
            "images_per_s": len(labels) * epoch / sum(epoch_s[:epoch]),
            "ari_kmeans": cls["ari"], "kmeans_sizes": cls["class_sizes"],
            "fsc_auc_mean": conf["fsc_auc_mean"], "fsc_auc_per_state": [p["auc"] for p in conf["per_state"]],
            "fsc_auc_kmeans_centres_mean": float(np.mean([p["auc"] for p in per_class])),
            "per_class": per_class}


def ours(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {"run": str(run), "fsc_auc_mean": m["val/fsc_auc_mean"], "ari": m.get("val/ari"),
            "fsc_auc_per_state": [p["auc"] for p in m["val/per_state"]], "class_sizes": m.get("val/class_sizes"),
            "train_s": m.get("train/wall_time_s"), "epochs": m.get("train/epochs")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tomotwin3")
    ap.add_argument("--ours", type=Path, required=True, help="run folder of python -m cryobench_lab model=hydra")
    ap.add_argument("--cryodrgn-out", type=Path, required=True)
    ap.add_argument("--train", action="store_true", help="run train_vae first (else score an existing output)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--epoch", type=int, default=None, help="epochs after which to score (weights.E.pkl; default: the last written)")
    ap.add_argument("--cryodrgn", default=str(REPO / ".venv-cryodrgn" / "bin" / "cryodrgn"))
    args = ap.parse_args()
    from cryobench_lab.data.presets import ensure_dataset

    folder = Path(ensure_dataset(args.preset))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                         f"torch {torch.__version__} (shared with other jobs)",
              "load_average_at_start": os.getloadavg(), "preset": args.preset}
    peer = train(folder, args.cryodrgn, args.epochs, args.cryodrgn_out) if args.train else {}
    peer.update(score(folder, args.cryodrgn, args.cryodrgn_out, args.epoch))
    result["cryodrgn"] = peer
    out_path = REPO / "bench" / "results" / "mixture_quality.json"
    print("| method | epochs | mean FSC-AUC (per-conformation) | per-state FSC-AUC | ARI | training time (s) |\n"
          "|---|---|---|---|---|---|")
    if (args.ours / "metrics.json").exists():  # a run still training is left out
        result["ours"] = o = ours(args.ours)
        print(f"| model=hydra | {o['epochs']} | {o['fsc_auc_mean']:.4f} | {', '.join(f'{a:.3f}' for a in o['fsc_auc_per_state'])} "
              f"| {o['ari']:.3f} | {o['train_s']:.0f} |")
    out_path.write_text(json.dumps(result, indent=2))
    print(f"| cryoDRGN train_vae | {peer['epochs_trained']} | {peer['fsc_auc_mean']:.4f} | "
          f"{', '.join(f'{a:.3f}' for a in peer['fsc_auc_per_state'])} | {peer['ari_kmeans']:.3f} (k-means) | "
          f"{peer['train_s']:.0f} |")
    print(f"cryoDRGN k-means centre volumes: mean FSC-AUC {peer['fsc_auc_kmeans_centres_mean']:.4f}, {peer['per_class']}")
    print(f"written {out_path}")


if __name__ == "__main__":
    main()
