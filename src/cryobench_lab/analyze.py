"""Analyse a finished run of a latent method (cryoDRGN's ``analyze`` step):
``python -m cryobench_lab.analyze run_dir=<run folder> [ksample=20] [pc=2] [n_per_pc=10] [umap=auto]
[--z Z1 [Z2 ...]] [--class K] [out=<folder>]``.

Loads the run's config and checkpoint like ``eval``, embeds every particle and writes into
``<run folder>/analyze/`` (or ``out=``):

- ``z.pkl``: the latent of every image, float32 (N, zdim) (cryoDRGN's format; the assigned class's latent
  for a mixture), ``classes.pkl`` (N,) int64 assigned classes (0-based; zeros for one class);
- ``pca.png`` (and ``umap.png`` when ``umap-learn`` is installed; ``pip install umap-learn``): the latents
  coloured by predicted class and, when the data carry labels, by ground-truth state, side by side;
- ``kmeans<k>/``: k-means (k-means++ seeding, seed 0) of the latents into ``ksample`` clusters;
  ``vol_XXX.mrc`` at the latent of the image nearest each centre (an on-data latent, as cryoDRGN does),
  ``centers_ind.txt`` (that image, 0-based), ``centers.txt`` (its latent), ``labels.pkl`` (cluster per image);
- ``pc<i>/vol_XXX.mrc``: ``n_per_pc`` volumes along principal component i, from its 5th to 95th percentile
  through the mean latent, ``z_values.txt`` their latents;
- ``z_given/vol_XXX.mrc`` for the latents given with ``--z`` (numbers separated by commas or spaces, one
  latent per argument, or a .txt/.npy file of rows), ``z_values.txt``.

Each volume is decoded in a class: ``--class K`` if given, else the class of the image whose latent is
nearest (a mixture's classes each have their own latent space). Maps carry the voxel size and the origin of
the box centre (io/mrc.py), like every map of a run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.cli import fail
from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import write_text_atomic
from cryobench_lab.io.exports import save_latents
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.io.pickles import save_pickle
from cryobench_lab.metrics.latent import assigned_latent, pca_embedding, umap_embedding

USAGE = """usage: python -m cryobench_lab.analyze run_dir=<run folder> [ckpt=<file.ckpt>] [out=<folder>] [ksample=20] \
[pc=2] [n_per_pc=10] [umap=auto|true|false] [--z Z1 [Z2 ...]] [--class K] [key=value ...]

Latent analysis of a finished run of a latent method (hydra, drgnai, cryodrgn, segvae ...) into <run folder>/analyze/:
z.pkl, pca.png/umap.png coloured by predicted class and true state, k-means volumes, volumes along principal
components, volumes at the latents given with --z (a file, or numbers separated by commas, one latent per argument)."""


def parse_latents(values: list[str], zdim: int) -> np.ndarray:
    """``--z`` values → (M, zdim) float32: one latent per argument (commas or spaces), or one .txt/.npy file."""
    if len(values) == 1 and Path(values[0]).suffix in (".txt", ".npy"):
        path = Path(values[0])
        if not path.is_file():
            raise InputError(f"--z {path}: file not found; give a .txt/.npy file of latents or the numbers")
        z = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    else:
        try:
            z = np.array([[float(x) for x in v.replace(",", " ").split()] for v in values])
        except ValueError:
            raise InputError(f"--z {' '.join(values)}: not numbers; give each latent as {zdim} numbers "
                             "separated by commas, e.g. --z 0.1,-0.3") from None
    z = np.atleast_2d(np.asarray(z, np.float32))
    if z.ndim != 2 or z.shape[1] != zdim:
        raise InputError(f"--z: latents of dimension {z.shape[-1]} given, the model's latent has {zdim}; "
                         f"give {zdim} numbers per latent")
    return z


def _volumes(folder: Path, model, z: torch.Tensor, classes: torch.Tensor, apix: float) -> list[Path]:
    """Decode latents ``z (M, d)`` in ``classes (M,)`` → ``folder/vol_XXX.mrc`` + ``z_values.txt``."""
    paths = []
    with torch.no_grad():
        for i in range(len(z)):
            vol = model.decode(z[i : i + 1].to(model.device), classes[i : i + 1].to(model.device))[0]
            paths.append(folder / f"vol_{i:03d}.mrc")
            write_mrc(paths[-1], vol.float().cpu().numpy(), apix=apix)
    rows = "\n".join(" ".join(f"{v:.6g}" for v in row) + f"  # class {int(k)}" for row, k in zip(z.tolist(), classes))
    write_text_atomic(folder / "z_values.txt", rows + "\n")
    return paths


def _nearest_class(z_all: torch.Tensor, classes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return classes[torch.cdist(z.float(), z_all.float()).argmin(1)]


def _embedding_figure(path: Path, emb, classes, labels, axis_labels) -> Path:
    from cryobench_lab.plots import plot_latent

    return plot_latent(path, emb, labels, axis_labels=axis_labels, classes=classes,
                       title="UMAP of the latents" if "UMAP" in axis_labels[0] else "PCA of the latents")


def analyze(model, datamodule, out: Path, ksample: int = 20, pc: int = 2, n_per_pc: int = 10,
            use_umap: str = "auto", z_given: list[str] | None = None, class_given: int | None = None) -> dict:
    """Write the outputs listed in the module docstring into ``out``; returns ``{name: path or list}``."""
    from cryobench_lab.models.multiclass import kmeans_pp

    out = Path(out)
    model.eval()
    emb = model.embed_all(datamodule.all_dataloader())
    if emb["latent"] is None:
        raise InputError(f"model={model.method_name} has no latent space to analyse; analyze is for latent methods "
                         "(hydra, drgnai, cryodrgn, segvae, ...)")
    order = torch.argsort(emb["index"])
    probs = emb["class_probs"][order] if emb["class_probs"] is not None else None
    z = assigned_latent(emb["latent"][order], probs).float()  # (N, d)
    N, d = z.shape
    zg = torch.from_numpy(parse_latents(z_given, d)) if z_given else None  # bad input: fail before writing
    classes = probs.argmax(1) if probs is not None else torch.zeros(N, dtype=torch.long)
    labels = torch.as_tensor(datamodule.info.labels) if datamodule.info.labels is not None else None
    apix = datamodule.info.apix
    written: dict = {"z": save_latents(out / "z.pkl", z)}
    save_pickle(out / "classes.pkl", classes.numpy().astype(np.int64))
    if d >= 2:
        pcs, explained = pca_embedding(z, min(max(pc, 2), d))
        written["pca"] = _embedding_figure(out / "pca.png", pcs[:, :2], classes, labels,
                                           [f"PC{i + 1} ({100 * float(e):.0f}% var.)" for i, e in enumerate(explained[:2])])
    else:
        pcs = z - z.mean(0)
        written["pca"] = _embedding_figure(out / "pca.png", z, classes, labels, ["latent z"])
    if use_umap != "false" and d >= 2:
        umap_xy = umap_embedding(z)
        if umap_xy is None:
            if use_umap == "true":
                raise InputError("umap=true: umap-learn is not installed; pip install umap-learn, or umap=false")
            print("[cryobench_lab] umap-learn is not installed: PCA only (pip install umap-learn for umap.png)",
                  file=sys.stderr)
        else:
            written["umap"] = _embedding_figure(out / "umap.png", umap_xy, classes, labels, ["UMAP 1", "UMAP 2"])
    k = min(ksample, N)
    if k > 0:
        g = torch.Generator().manual_seed(0)
        clusters = kmeans_pp(z.double(), k, g)
        centres = torch.stack([z[clusters == j].mean(0) if (clusters == j).any() else z[0] for j in range(k)])
        nearest = torch.cdist(centres, z).argmin(1)  # on-data latents
        folder = out / f"kmeans{k}"
        save_pickle(folder / "labels.pkl", clusters.numpy().astype(np.int64))
        write_text_atomic(folder / "centers_ind.txt", "\n".join(str(int(i)) for i in nearest) + "\n")
        np.savetxt(folder / "centers.txt", z[nearest].numpy())
        written["kmeans"] = _volumes(folder, model, z[nearest], classes[nearest], apix)
    centred = z - z.mean(0)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    for i in range(min(pc, d)):
        axis = vh[i].float()
        axis = axis * torch.sign(axis[axis.abs().argmax()])  # reproducible direction
        lo, hi = torch.quantile(centred @ axis, torch.tensor([0.05, 0.95]))
        path_z = z.mean(0) + torch.linspace(float(lo), float(hi), n_per_pc)[:, None] * axis
        cls = torch.full((n_per_pc,), class_given) if class_given is not None else _nearest_class(z, classes, path_z)
        written[f"pc{i + 1}"] = _volumes(out / f"pc{i + 1}", model, path_z, cls, apix)
    if zg is not None:
        cls = torch.full((len(zg),), class_given) if class_given is not None else _nearest_class(z, classes, zg)
        written["z_given"] = _volumes(out / "z_given", model, zg, cls, apix)
    return written


def _split_args(argv: list[str]) -> tuple[dict, list[str], int | None]:
    """key=value pairs, the values after --z, and --class."""
    pairs, z_values, class_given, i = {}, [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--z":
            i += 1
            while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                z_values.append(argv[i])
                i += 1
            continue
        if a == "--class":
            if i + 1 >= len(argv) or not argv[i + 1].lstrip("-").isdigit():
                fail("--class needs a class number, e.g. --class 0")
            class_given = int(argv[i + 1])
            i += 2
            continue
        if "=" not in a:
            fail(f"analyze: unexpected argument {a!r}; {USAGE.splitlines()[0]}")
        key, value = a.split("=", 1)
        pairs[key] = value
        i += 1
    return pairs, z_values, class_given


def main(argv: list[str] | None = None) -> None:
    from cryobench_lab.eval import load_trained

    argv = argv if argv is not None else sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    args, z_values, class_given = _split_args(argv)
    if "run_dir" not in args:
        fail(USAGE.splitlines()[0])
    special = {"run_dir", "ckpt", "out", "ksample", "pc", "n_per_pc", "umap"}
    overrides = [f"{k}={v}" for k, v in args.items() if k not in special]
    run_dir = Path(args["run_dir"])
    try:
        ints = {k: int(args.get(k, default)) for k, default in (("ksample", 20), ("pc", 2), ("n_per_pc", 10))}
    except ValueError:
        fail("ksample, pc and n_per_pc must be whole numbers, e.g. ksample=20")
    umap_option = args.get("umap", "auto").lower()
    if umap_option not in ("auto", "true", "false"):
        fail(f"umap={umap_option}: use auto, true or false")
    try:
        _, datamodule, model, _ = load_trained(run_dir, Path(args["ckpt"]) if "ckpt" in args else None, overrides)
        if class_given is not None and not 0 <= class_given < getattr(model, "K", 1):
            raise InputError(f"--class {class_given}: the model has classes 0..{getattr(model, 'K', 1) - 1}")
        written = analyze(model, datamodule, Path(args.get("out", run_dir / "analyze")), use_umap=umap_option,
                          z_given=z_values or None, class_given=class_given, **ints)
    except InputError as err:
        fail(str(err))
    print(f"analysis written to {Path(written['z']).parent}: " + ", ".join(sorted(written)))


if __name__ == "__main__":
    main()
