"""The mixture of neural fields (model=hydra) against cryoDRGN `train_vae`: throughput, memory, quality.

Same images (a dataset preset, default tomotwin3 at D=64), fixed poses, equal networks (3 residual hidden
layers of 256 in decoder and encoder, as cryoDRGN's --dec-layers/--enc-layers count them; 96 Gaussian
frequencies). cryoDRGN is GPL and runs as a separate program from a bench-only environment:

    python3 -m venv .venv-cryodrgn && .venv-cryodrgn/bin/pip install torch==2.13.0 cryodrgn==4.3.1
    .venv/bin/python bench/mixture_speed.py [--sections throughput quality] [--cryodrgn-epochs 20]

Sections:

``throughput``
    Training images/s and peak memory (max RSS of a fresh process): ours at full band for K=1 (d=8) and
    K=3 (d=2): every class evaluated with soft posteriors (warm-up: every pair differentiated) or with
    confident ones (a trained model's E-step: one differentiated pair per image), hard assignment (one
    class per image), and one shared decoder; each in float32 and in bfloat16 autocast, each timed over ``--steps`` optimiser steps after two warm-up steps in a process
    of its own; cryoDRGN train_vae (batch 64, float32: its mixed precision is CUDA-only) timed over one
    epoch of the same number of images (``--ind``). ``--rounds`` interleaved rounds; the ratio to
    cryoDRGN is the median over rounds of ours / cryoDRGN in the same round, so that both sides of a
    ratio ran under the same machine load (the machine may be shared).
``quality``
    cryoDRGN train_vae for ``--cryodrgn-epochs`` at its defaults (batch 16, lr 1e-4, β = 1/d) except the
    network size: ARI of k-means (K = number of states) on its latents and the per-conformation FSC-AUC
    (metrics/protocols.py; volumes from `cryodrgn eval_vol`). Then ``model=hydra`` at its defaults,
    trained in-process with the per-conformation FSC after every epoch (evaluation time excluded from the
    clock): time-to-quality = training time until its mean FSC-AUC reaches cryoDRGN's final one.

``variants``
    ``python -m cryobench_lab`` end to end for the acceptance runs (:data:`VARIANTS`): wall time, peak
    memory, mean per-conformation FSC-AUC, ARI against states and, where states share a complex, against
    complexes, class sizes.

Writes bench/results/mixture_speed.json (sections merge into an existing file) and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
NET = {"hidden_dim": 256, "n_layers": 3, "n_features": 96}
CRYODRGN_NET = ["--enc-dim", "256", "--enc-layers", "3", "--dec-dim", "256", "--dec-layers", "3"]


def _datamodule(preset: str, batch_size: int = 64):
    from omegaconf import OmegaConf

    from cryobench_lab.config import DataConfig
    from cryobench_lab.data.particles import ParticleDataModule

    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": preset, "preset": preset, "batch_size": batch_size})
    dm = ParticleDataModule(cfg, seed=0)
    dm.setup()
    return dm


def _run_measured(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` in a fresh launcher process; returns (result, wall s, peak RSS MB of the command)."""
    launcher = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True, check=False, **kwargs)
    wall = time.perf_counter() - t0
    rss = re.findall(r"MAXRSS_KB (\d+)", proc.stderr)
    return proc, wall, (int(rss[-1]) / 1024 if rss else float("nan"))


# ---- throughput -------------------------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    """Time ``spec['steps']`` training steps of MixtureOfFields at full band (runs inside a subprocess)."""
    from cryobench_lab.models.mixture_of_fields import MixtureOfFields

    torch.manual_seed(0)
    dm = _datamodule(spec["preset"])
    model = MixtureOfFields(dm.info, **spec["model"])
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(spec["steps"] + 2)]
    full = model._points(model.D // 2, "cpu")
    model._set_scales(model._observe(batches[0], full), full)
    # hard mode: every image already confidently assigned (to its ground-truth state)
    model.last_confidence.fill_(1.0)
    model.last_class.copy_(torch.as_tensor(dm.info.labels) % model.K)
    if spec.get("sharp"):  # a trained model's posteriors: one class per image above the gradient floor
        model.noise_power.mul_(1e-3)
    opts = model.configure_optimizers()
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        out = model._loss(batch, model.D // 2, all_classes=spec["all_classes"], balanced=False)
        for opt in opts:
            opt.zero_grad()
        out["loss"].backward()
        for opt in opts:
            opt.step()
        times.append(time.perf_counter() - t0)
    n_images = sum(len(b["index"]) for b in batches[2:])
    B = len(batches[-1]["index"])
    return {"images_per_s": n_images / sum(times[2:]), "pairs_per_image": out["n_pairs"] / B,
            "grad_pairs_per_image": out["n_grad_pairs"] / B}


def throughput(preset: str, cryodrgn: str, steps: int, rounds: int, work: Path) -> list[dict]:
    """``rounds`` interleaved rounds of every configuration (ours, then cryoDRGN on a subset of images)."""
    from cryobench_lab.data.presets import ensure_dataset
    from cryobench_lab.io.pickles import save_pickle

    folder = Path(ensure_dataset(preset))
    ours = [  # (label, model keys, every class evaluated, sharp posteriors)
        ("hydra K=1 (d=8)", {"n_classes": 1, "latent_dim": 8}, True, False),
        ("hydra K=3 (d=2), every class, soft posteriors", {"n_classes": 3, "latent_dim": 2}, True, False),
        ("hydra K=3 (d=2), every class, confident posteriors", {"n_classes": 3, "latent_dim": 2}, True, True),
        ("hydra K=3 (d=2), hard assignment", {"n_classes": 3, "latent_dim": 2}, False, False),
        ("hydra K=3 (d=2), one shared decoder, every class, soft posteriors",
         {"n_classes": 3, "latent_dim": 2, "decoder": "shared"}, True, False),
    ]
    # cryoDRGN trains one epoch on as many images as ours times, plus two warm-up batches
    subset = work / "subset.pkl"
    save_pickle(subset, np.arange(64 * (steps + 2), dtype=np.int64))
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for label, model, all_classes, sharp in ours:
            for bf16 in (False, True):
                spec = {"preset": preset, "steps": steps, "all_classes": all_classes, "sharp": sharp,
                        "model": {**NET, **model, "bf16": bf16}}
                proc, _, rss = _run_measured([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=work)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                runs.setdefault(f"{label}, {'bf16' if bf16 else 'fp32'}", []).append({**res, "peak_rss_mb": rss})
        out = work / "cryodrgn_speed"
        proc, _, rss = _run_measured([
            cryodrgn, "train_vae", str(folder / "particles.mrcs"), "--poses", str(folder / "poses.pkl"), "--ctf",
            str(folder / "ctf.pkl"), "--zdim", "8", *CRYODRGN_NET, "-n", "1", "-b", "64", "--ind", str(subset),
            "--no-analysis", "-o", str(out),
        ])
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        epoch_s = _cryodrgn_epoch_times(out / "run.log")[-1]
        runs.setdefault("cryoDRGN train_vae (d=8), fp32", []).append(
            {"images_per_s": 64 * (steps + 2) / epoch_s, "pairs_per_image": 1.0, "grad_pairs_per_image": 1.0,
             "peak_rss_mb": rss})
        print({k: round(v[-1]["images_per_s"], 1) for k, v in runs.items()}, flush=True)
    peer = [r["images_per_s"] for r in runs.pop("cryoDRGN train_vae (d=8), fp32")]
    rows = []
    for name, rs in runs.items():
        ips = [r["images_per_s"] for r in rs]
        rows.append({"method": name, "images_per_s": float(np.median(ips)), "rounds": ips,
                     "ratio_to_cryodrgn": float(np.median(np.asarray(ips) / np.asarray(peer))),
                     "pairs_per_image": rs[0]["pairs_per_image"], "grad_pairs_per_image": rs[0]["grad_pairs_per_image"],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)})
    rows.append({"method": "cryoDRGN train_vae (d=8), fp32", "images_per_s": float(np.median(peer)), "rounds": peer,
                 "ratio_to_cryodrgn": 1.0, "pairs_per_image": 1.0, "grad_pairs_per_image": 1.0, "peak_rss_mb": rss})
    return rows


def _cryodrgn_epoch_times(log: Path) -> list[float]:
    """Seconds per epoch from cryoDRGN's run.log ('... Epoch: N ... Finished in H:MM:SS.s')."""
    times = []
    for h, m, s in re.findall(r"Finished in (\d+):(\d+):([\d.]+)", log.read_text()):
        times.append(int(h) * 3600 + int(m) * 60 + float(s))
    if not times:
        raise RuntimeError(f"{log}: no 'Finished in' line; cryoDRGN's log format changed?")
    return times


# ---- quality ----------------------------------------------------------------------------------------------
def kmeans(z: np.ndarray, k: int, restarts: int = 10, iters: int = 100, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; the labelling of lowest inertia over ``restarts``."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centres = [z[rng.integers(len(z))]]
        for _ in range(1, k):
            d2 = np.min(((z[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            centres.append(z[rng.choice(len(z), p=d2 / d2.sum())])
        c = np.asarray(centres)
        for _ in range(iters):
            labels = ((z[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.asarray([z[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = ((z - c[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def cryodrgn_quality(preset: str, cryodrgn: str, epochs: int, out: Path) -> dict:
    """cryoDRGN train_vae trained and scored by bench/mixture_quality.py (one protocol for both scripts).

    An ``out`` that already holds ``weights.<epochs>.pkl`` (e.g. from ``mixture_quality.py --train``) is
    scored without training again; its epoch times come from its run.log.
    """
    from mixture_quality import score, train

    from cryobench_lab.data.presets import ensure_dataset

    folder = Path(ensure_dataset(preset))
    row = {"method": f"cryoDRGN train_vae, {epochs} epochs"}
    if not (out / f"weights.{epochs}.pkl").exists():
        row.update(train(folder, cryodrgn, epochs, out))
    return {**row, **score(folder, cryodrgn, out, epochs)}


def ours_quality(preset: str, model_name: str, overrides: dict, work: Path) -> dict:
    """Train a model config in-process; FSC after every epoch; clock paused during evaluation."""
    import lightning as L
    from omegaconf import OmegaConf

    from cryobench_lab.metrics.classes import classification_metrics
    from cryobench_lab.metrics.protocols import per_conformation_fsc
    from cryobench_lab.models.mixture_of_fields import MixtureOfFields

    L.seed_everything(0, verbose=False)
    dm = _datamodule(preset)
    cfg = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / f"{model_name}.yaml")).items() if k != "_target_"}
    model = MixtureOfFields(dm.info, **{**cfg, **overrides})
    history = []

    class Clock(L.Callback):
        def __init__(self):
            self.train_s, self.t0 = 0.0, 0.0

        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.train_s += time.perf_counter() - self.t0
            emb = pl_module.embed_all(dm.all_dataloader())
            labels = torch.as_tensor(dm.info.labels)[emb["index"]]
            conf = per_conformation_fsc(pl_module.decode, labels, emb["latent"], emb["class_probs"], dm.info.gt_volumes, dm.info.apix)
            row = {"epoch": trainer.current_epoch + 1, "train_s": self.train_s, "fsc_auc_mean": conf["fsc_auc_mean"]}
            if emb["class_probs"] is not None:
                cls = classification_metrics(emb["class_probs"], labels)
                row.update(ari=cls["ari"], class_sizes=cls["class_sizes"])
            history.append(row)
            print(row, flush=True)

    trainer = L.Trainer(max_epochs=model.default_epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(work / model_name), callbacks=[Clock()])
    trainer.fit(model, datamodule=dm)
    last = history[-1]
    return {"method": f"{model_name} {overrides or ''}".strip(), "history": history, "fsc_auc_mean": last["fsc_auc_mean"],
            "ari": last.get("ari"), "train_s": last["train_s"],
            "images_per_s": dm.info.n_particles * len(history) / last["train_s"]}


VARIANTS = {
    # acceptance 1-2: hydra at its defaults; K=1, d=8 (DRGN-AI); K=5
    "hydra": ("hydra", "tomotwin3", []),
    "drgnai": ("drgnai", "tomotwin3", []),
    "hydra_k5": ("hydra", "tomotwin3", ["model.n_classes=5"]),
    # K separate decoders (default) against one decoder with a class embedding
    "hydra_shared": ("hydra", "tomotwin3", ["model.decoder=shared"]),
    # acceptance 3: the baselines on a compositional and a conformational dataset
    "classify3d": ("classify3d", "tomotwin3", []),
    "cryodrgn": ("cryodrgn", "tomotwin3", []),
    "classify3d_adk": ("classify3d", "adk", []),
    "cryodrgn_adk": ("cryodrgn", "adk", []),
    # acceptance 4: two complexes that each move; K=2 against K=1 with the same epochs
    "hydra_ribosplike": ("hydra", "ribosplike", ["model.n_classes=2"]),
    "drgnai_ribosplike": ("drgnai", "ribosplike", []),
}


def run_variant(key: str, work: Path) -> dict:
    """``python -m cryobench_lab`` on one (model, data, overrides); metrics, wall time and peak memory.

    ARI is also computed against complexes (states sharing a frame in the dataset's meta.json), the
    classification Hydra's ribosplike is scored by.
    """
    from cryobench_lab.data.presets import ensure_dataset
    from cryobench_lab.io.pickles import load_pickle
    from cryobench_lab.metrics.classes import classification_metrics

    model, data, overrides = VARIANTS[key]
    out = work / key
    proc, wall, rss = _run_measured(
        [sys.executable, "-m", "cryobench_lab", f"model={model}", f"data={data}", *overrides, "logger=none",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"],
        env=dict(os.environ, WANDB_MODE="disabled"),
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    m = json.loads((out / "metrics.json").read_text())
    row = {"variant": key, "command": f"python -m cryobench_lab model={model} data={data} {' '.join(overrides)}".strip(),
           "wall_s": wall, "peak_rss_mb": rss, "train_s": m["train/wall_time_s"], "epochs": m["train/epochs"],
           "fsc_auc_mean": m["val/fsc_auc_mean"], "fsc_auc_per_state": [p["auc"] for p in m["val/per_state"]],
           "ari": m.get("val/ari"), "class_sizes": m.get("val/class_sizes")}
    meta = json.loads((Path(ensure_dataset(data)) / "meta.json").read_text())
    frames = [st.get("frame") or st["name"] for st in meta["states"]]
    if len(set(frames)) < len(frames) and (out / "classes" / "classes.pkl").exists():
        complex_of_state = np.unique(frames, return_inverse=True)[1]
        labels = complex_of_state[np.load(Path(ensure_dataset(data)) / "labels.npy")]
        classes = load_pickle(out / "classes" / "classes.pkl")
        row["ari_complexes"] = classification_metrics(torch.as_tensor(classes), torch.as_tensor(labels))["ari"]
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tomotwin3")
    ap.add_argument("--sections", nargs="+", default=["throughput", "quality", "variants"],
                    choices=["throughput", "quality", "variants"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cryodrgn", default=str(REPO / ".venv-cryodrgn" / "bin" / "cryodrgn"))
    ap.add_argument("--cryodrgn-epochs", type=int, default=20)
    ap.add_argument("--cryodrgn-out", type=Path, help="train_vae output folder to reuse (quality section)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    out_path = REPO / "bench" / "results" / "mixture_speed.json"
    results: dict = {}
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    results["load_average_at_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "throughput" in args.sections:
            rows = throughput(args.preset, args.cryodrgn, args.steps, args.rounds, work)
            results["throughput"] = rows
            print("\n| method (full band, D=64, batch 64) | images/s (median) | × cryoDRGN (median of rounds) | "
                  "(image, class) pairs per image: evaluated / differentiated | peak RSS (MB) |\n|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['method']} | {r['images_per_s']:.1f} | {r['ratio_to_cryodrgn']:.2f} | "
                      f"{r['pairs_per_image']:.1f} / {r['grad_pairs_per_image']:.1f} | {r['peak_rss_mb']:.0f} |")
        if "quality" in args.sections:
            peer = cryodrgn_quality(args.preset, args.cryodrgn, args.cryodrgn_epochs,
                                    args.cryodrgn_out or work / "cryodrgn_quality")
            print(peer, flush=True)
            ours = ours_quality(args.preset, "hydra", {}, work)
            reached = [h for h in ours["history"] if h["fsc_auc_mean"] >= peer["fsc_auc_mean"]]
            ours["time_to_cryodrgn_quality_s"] = reached[0]["train_s"] if reached else None
            results["quality"] = {"cryodrgn": peer, "hydra": ours}
            print("\n| method | mean FSC-AUC | ARI | training time (s) | images/s | time to cryoDRGN's FSC-AUC (s) |\n|---|---|---|---|---|---|")
            print(f"| {peer['method']} | {peer['fsc_auc_mean']:.4f} | {peer['ari_kmeans']:.3f} (k-means) | "
                  f"{peer['train_s']:.0f} | {peer['images_per_s']:.1f} | {peer['train_s']:.0f} |")
            ttq = ours["time_to_cryodrgn_quality_s"]
            print(f"| model=hydra | {ours['fsc_auc_mean']:.4f} | {ours['ari']:.3f} | {ours['train_s']:.0f} | "
                  f"{ours['images_per_s']:.1f} | {'not reached' if ttq is None else f'{ttq:.0f}'} |")
        if "variants" in args.sections:
            done = results.setdefault("variants", {})
            for key in args.variants:
                done[key] = run_variant(key, work)
                _save(out_path, results)  # keep finished runs if a later one fails
            print("\n| command | mean FSC-AUC | ARI (states) | ARI (complexes) | class sizes | wall (s) |\n|---|---|---|---|---|---|")
            for r in done.values():
                ari = "" if r["ari"] is None else f"{r['ari']:.3f}"
                arc = f"{r['ari_complexes']:.3f}" if r.get("ari_complexes") is not None else ""
                print(f"| `{r['command']}` | {r['fsc_auc_mean']:.4f} | {ari} | {arc} | {r['class_sizes'] or ''} | {r['wall_s']:.0f} |")
    _save(out_path, results)
    print(f"\nwritten {out_path}")


def _save(path: Path, results: dict) -> None:
    """Merge ``results`` into the JSON at ``path`` (several sections may run as separate processes)."""
    merged = json.loads(path.read_text()) if path.exists() else {}
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))


if __name__ == "__main__":
    main()
