"""The published CryoBench dataset layout: read a download, or write a replica of it.

A CryoBench dataset folder (``data.root``; Zenodo downloads IgG-1D, IgG-RL, Ribosembly, Tomotwin-100,
Spike-MD) holds::

    <root>/images/snr<SNR>/sorted_particles.<D>.txt   one .mrcs file name per line (relative to that folder)
    <root>/images/snr<SNR>/*.mrcs                      the stacks it lists, (n, D, D) float32
    <root>/combined_poses.pkl                          (rot (N, 3, 3), trans (N, 2) as a fraction of the box)
    <root>/combined_ctfs.pkl                           (N, 9) cryoDRGN CTF, stored on the simulation grid
                                                        (D=256, 1.5 Å); rescaled to the stack: apix × 256 / D
    <root>/gt_latents.pkl   (or labels.pkl)            (N,) integer ground-truth state of each image
    <root>/vols/<D>_org/*.mrc                           one ground-truth volume per state, in numeric order
    <root>/init_mask/mask.mrc                          the real-space mask of CryoBench's masked FSC

Images of one state are contiguous and states come in label order (CryoBench's per-conformation scripts
rely on that order; the reader here uses the labels and does not). Every missing or malformed piece is an
:class:`~cryobench_lab.errors.InputError` naming the file and the expected layout.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import read_mrc, write_mrc, write_stack
from cryobench_lab.io.particles import ParticleMetadata, load_particles
from cryobench_lab.io.pickles import load_pickle, save_ctf, save_pickle, save_poses
from cryobench_lab.io.volumes import order_by_state_number

LAYOUT = ("expected CryoBench layout: <root>/images/snr<SNR>/sorted_particles.<D>.txt (+ the .mrcs it lists), "
          "<root>/combined_poses.pkl, <root>/combined_ctfs.pkl, <root>/gt_latents.pkl (or labels.pkl), "
          "<root>/vols/<D>_org/*.mrc, <root>/init_mask/mask.mrc")

#: The published datasets (domain.md §4): folder name, states, images, pixel size (Å) at D=128.
DATASETS = {
    "igg1d": {"folder": "IgG-1D", "states": 100, "images": 100_000, "apix": 3.0,
              "kind": "conformational: 100 states of one Fab dihedral, 1000 images each"},
    "iggrl": {"folder": "IgG-RL", "states": 100, "images": 100_000, "apix": 3.0,
              "kind": "conformational: 100 random linker states, 1000 images each"},
    "ribosembly": {"folder": "Ribosembly", "states": 16, "images": 335_240, "apix": 3.0,
                   "kind": "compositional: 16 ribosome assembly states, unequal populations"},
    "tomotwin100": {"folder": "Tomotwin-100", "states": 100, "images": 100_000, "apix": 4.5,
                    "kind": "compositional: 100 different complexes, 1000 images each"},
    "spikemd": {"folder": "Spike-MD", "states": 100_000, "images": 100_000, "apix": 3.0,
                "kind": "conformational: 100,000 MD frames, one image each"},
}

#: CryoBench stores CTF parameters on its simulation grid: twice the released box at half the pixel.
STORED_GRID_FACTOR = 2


@dataclass
class CryoBenchData:
    """A CryoBench dataset read from disk: particles (poses, CTF at the stack's box), labels, truth files."""

    particles: ParticleMetadata
    labels: np.ndarray  # (N,) int64 state of each image
    volume_files: list[str]  # one .mrc per state, label order
    mask_file: str
    root: str
    volume_box: int  # px, box of the ground-truth volumes and the mask
    files: dict = field(default_factory=dict)  # what was read, for the run's metadata


def _fail(path, problem: str) -> InputError:
    return InputError(f"{path}: {problem}; {LAYOUT}")


def _images_folder(root: Path, snr: float | None) -> Path:
    images = root / "images"
    if not images.is_dir():
        raise _fail(images, "folder not found")
    if snr is not None:
        folder = images / f"snr{snr:g}"
        if not folder.is_dir():
            have = sorted(p.name for p in images.glob("snr*") if p.is_dir())
            raise _fail(folder, f"folder not found (have {have or 'none'}; set data.snr to one of them)")
        return folder
    folders = sorted(p for p in images.glob("snr*") if p.is_dir())
    if len(folders) != 1:
        raise _fail(images, f"holds {len(folders)} snr<SNR> folders; set data.snr to choose one")
    return folders[0]


def _particle_list(folder: Path) -> Path:
    lists = sorted(folder.glob("*.txt"))
    if len(lists) != 1:
        raise _fail(folder, f"holds {len(lists)} .txt stack lists, expected one (sorted_particles.<D>.txt); "
                    "or pass data.particles=<the .txt>")
    return lists[0]


def read_labels(root: Path, n: int) -> tuple[np.ndarray, Path]:
    """The (N,) int64 state of each image from ``gt_latents.pkl`` (or ``labels.pkl``)."""
    candidates = [root / "gt_latents.pkl", root / "labels.pkl"]
    present = [p for p in candidates if p.is_file()]
    if not present:
        raise _fail(root / "gt_latents.pkl", "file not found (nor labels.pkl)")
    problems = []
    for path in present:
        value = load_pickle(path)
        arr = np.asarray(value)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        # Integer states, possibly stored as floats; a continuous latent (floats, or (N, k)) is not a label.
        if arr.ndim == 1 and arr.dtype.kind in "iuf" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            if len(arr) != n:
                raise _fail(path, f"has {len(arr)} labels but the stacks hold {n} images")
            if len(arr) and arr.min() < 0:
                raise _fail(path, "labels must be non-negative state indices")
            return arr.astype(np.int64), path
        problems.append(f"{path.name} holds {arr.dtype} {arr.shape}")
    raise _fail(present[0], f"no integer state per image ({'; '.join(problems)})")


def volume_files(root: Path, D: int, n_states: int) -> list[str]:
    """The ground-truth volumes ``vols/<D>_org/*.mrc`` (numeric order), one per state; ``vols/128_org`` (the
    published box) when the stacks were downsampled to another ``D``."""
    folder = root / "vols" / f"{D}_org"
    files = []
    for candidate in dict.fromkeys([folder, root / "vols" / "128_org"]):
        files = order_by_state_number(list(candidate.glob("*.mrc")), str(candidate)) if candidate.is_dir() else []
        if files:
            folder = candidate
            break
    if not files:
        raise _fail(folder, "no ground-truth .mrc volumes found")
    if len(files) != n_states:
        raise _fail(folder, f"holds {len(files)} volumes but the labels name {n_states} states")
    return [str(f) for f in files]


def load_cryobench(
    root: str | os.PathLike,
    snr: float | None = None,
    particles: str | os.PathLike | None = None,
    apix: float | None = None,
) -> CryoBenchData:
    """Read a CryoBench dataset folder (module docstring) and check that every piece fits the others.

    Args:
        root: the dataset folder (e.g. ``.../IgG-1D``).
        snr: chooses ``images/snr<snr>/`` (None: the only such folder).
        particles: a ``.txt``/``.mrcs``/``.star`` to use instead of the folder's stack list.
        apix: Å/px the CTF pickle's rescaled pixel size must agree with (None: no check).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise _fail(root, "data.root is not a folder")
    txt = Path(particles) if particles else _particle_list(_images_folder(root, snr))
    poses, ctf = root / "combined_poses.pkl", root / "combined_ctfs.pkl"
    for path in (txt, poses, ctf):
        if not path.is_file():
            raise _fail(path, "file not found")
    try:
        meta = load_particles(txt, poses=poses, ctf=ctf, apix=apix)
    except InputError as err:
        raise InputError(f"{err}; {LAYOUT}") from None
    labels, labels_file = read_labels(root, meta.n)
    n_states = int(labels.max()) + 1
    vols = volume_files(root, meta.D, n_states)
    first, _ = read_mrc(vols[0])
    if first.ndim != 3 or len(set(first.shape)) != 1:
        raise _fail(vols[0], f"ground-truth volume has shape {first.shape}, expected a cubic (D, D, D) map")
    volume_box = int(first.shape[0])
    mask = root / "init_mask" / "mask.mrc"
    if not mask.is_file():
        raise _fail(mask, "file not found")
    read_mask(mask, volume_box)  # fail now, not at scoring time
    return CryoBenchData(
        particles=meta, labels=labels, volume_files=vols, mask_file=str(mask), root=str(root),
        volume_box=volume_box,
        files={"particles": str(txt), "poses": str(poses), "ctf": str(ctf), "labels": str(labels_file),
               "gt_volumes": str(Path(vols[0]).parent), "mask": str(mask), "volume_box": volume_box,
               "layout": "cryobench"},
    )


def read_mask(path: str | os.PathLike, D: int) -> np.ndarray:
    """The ``(D, D, D)`` float32 mask of ``init_mask/mask.mrc``; its box must equal the volumes' ``D``."""
    mask, _ = read_mrc(path)
    if mask.ndim != 3 or mask.shape != (D, D, D):
        raise _fail(path, f"mask has shape {mask.shape}, expected ({D}, {D}, {D}) like the ground-truth volumes")
    if not np.all(np.isfinite(mask)):
        raise _fail(path, "mask contains NaN or inf")
    return np.ascontiguousarray(mask, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# Writing a replica


def write_cryobench_layout(dataset: str | os.PathLike, out: str | os.PathLike, snr_name: str | None = None) -> Path:
    """Rewrite a simulated cryobench_lab dataset folder (``particles.mrcs``, ``poses.pkl``, ``ctf.pkl``,
    ``labels.npy``, ``gt_volumes/``, ``meta.json``) into the CryoBench layout at ``out``; returns ``out``.

    Images are reordered so that each state's images are contiguous, in label order, one stack per state
    (``images/snr<SNR>/<state>.<D>.mrcs``, listed in ``sorted_particles.<D>.txt``); poses, CTF and labels
    follow the same order. The CTF pickle is stored as CryoBench stores it, on a grid of twice the box at
    half the pixel size (``STORED_GRID_FACTOR``), so a reader must rescale apix. The mask
    ``init_mask/mask.mrc`` is the soft envelope (metrics.masks.volume_mask) of the mean ground-truth
    volume. The simulator's per-state atomic models (in the volume frame) go to ``replica_structures/``, outside
    CryoBench's layout, for atom-based methods (``model.structure=<root>/replica_structures/state_000.pdb``).
    ``snr_name`` names the images folder (default: the dataset's SNR, ``inf`` without noise).
    """
    from cryobench_lab.io.pickles import load_ctf, load_poses
    from cryobench_lab.metrics.masks import volume_mask

    src, out = Path(dataset), Path(out)
    meta = json.loads((src / "meta.json").read_text())
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: output folder exists and is not empty; choose a new folder or delete it")
    D, apix = int(meta["box_size"]), float(meta["apix"])
    labels = np.load(src / "labels.npy")
    order = np.argsort(labels, kind="stable")  # (N,) new row → old row
    labels = labels[order]
    rot, trans_px = load_poses(src / "poses.pkl", D=D)
    ctf = load_ctf(src / "ctf.pkl")[order]
    images, _ = read_mrc(src / "particles.mrcs")  # (N, D, D)
    snr_name = snr_name or (f"{meta['snr']:g}" if meta.get("snr") else "inf")
    img_dir = out / "images" / f"snr{snr_name}"
    img_dir.mkdir(parents=True)
    names = []
    for k in range(int(labels.max()) + 1):
        rows = order[labels == k]
        names.append(f"{k:03d}.{D}.mrcs")
        write_stack(img_dir / names[-1], np.ascontiguousarray(images[rows]), apix)
    (img_dir / f"sorted_particles.{D}.txt").write_text("\n".join(names) + "\n")
    save_poses(out / "combined_poses.pkl", rot[order], trans_px[order], D)
    ctf[:, 0] = STORED_GRID_FACTOR * D
    ctf[:, 1] = apix / STORED_GRID_FACTOR
    save_ctf(out / "combined_ctfs.pkl", ctf)
    save_pickle(out / "gt_latents.pkl", labels.astype(np.int64))
    vol_dir = out / "vols" / f"{D}_org"
    vol_dir.mkdir(parents=True)
    vols = []
    for k, f in enumerate(sorted((src / "gt_volumes").glob("*.mrc"))):
        v, _ = read_mrc(f)
        vols.append(v)
        write_mrc(vol_dir / f"{k:03d}.mrc", v, apix)
    if (src / "gt_structures").is_dir():  # not part of CryoBench's layout: base models for atom-based methods
        shutil.copytree(src / "gt_structures", out / "replica_structures")
    (out / "init_mask").mkdir()
    write_mrc(out / "init_mask" / "mask.mrc", volume_mask(np.mean(vols, axis=0)).numpy(), apix)
    (out / "replica.json").write_text(json.dumps({
        "written_by": "cryobench_lab.io.cryobench.write_cryobench_layout", "source": str(src.resolve()),
        "box_size": D, "apix": apix, "snr": meta.get("snr"), "n_particles": len(labels),
        "n_states": len(vols), "invert": meta.get("invert", True),
    }, indent=2) + "\n")
    return out
