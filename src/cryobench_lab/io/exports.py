"""Files that the field's own tools read: per-state FSC curves as text (CryoBench, cryoDRGN ``plot_fsc``),
RELION's ``run_model.star``, ChimeraX command scripts (``.cxc``), cryoDRGN latent pickles, and stack paths
that survive a cache clean.

Every writer takes plain arrays and paths (no model, no config), writes atomically and returns what it wrote.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryobench_lab.io.atomic import atomic_path, write_text_atomic
from cryobench_lab.io.pickles import save_pickle

#: RELION's value for a resolution it has not estimated (its first iterations write it too)
UNKNOWN_RESOLUTION = 999.0


def write_fsc_txt(path: Path, freq: np.ndarray, curve: np.ndarray, apix: float) -> Path:
    """One FSC curve as two whitespace columns, ``resolution`` (spatial frequency, 1/Å) and ``fsc``.

    freq in cycles/px (as in ``per_state``), converted with ``apix`` Å/px. Header lines start with ``#``,
    so ``numpy.loadtxt`` reads the file as an (n, 2) array.
    """
    freq, curve = np.asarray(freq, float), np.asarray(curve, float)
    rows = "\n".join(f"{f / apix:.6f} {c:.6f}" for f, c in zip(freq, curve))
    write_text_atomic(path, f"# FSC against the ground-truth volume; apix {apix:g} Å/px\n"
                            f"# resolution (1/Å) fsc\n{rows}\n")
    return Path(path)


def write_fsc_curves(folder: Path, per_state: Sequence[dict], apix: float) -> list[Path]:
    """``folder/state_XXX.txt`` for every per-state entry (``state``, ``freq`` cycles/px, ``curve``)."""
    return [write_fsc_txt(Path(folder) / f"state_{int(s['state']):03d}.txt", s["freq"], s["curve"], apix)
            for s in per_state if s.get("curve") is not None]


def write_model_star(path: Path, references: Sequence[str], fractions: Sequence[float],
                     resolutions: Sequence[float], apix: float, box_size: int) -> Path:
    """RELION's ``run_model.star``: ``data_model_general`` and ``data_model_classes``.

    references: each class's map (path relative to the star file); fractions: share of the images assigned
    to each class (sum 1); resolutions: each class's resolution in Å (``UNKNOWN_RESOLUTION`` where not
    measured, NaN is written as that too).
    """
    res = [UNKNOWN_RESOLUTION if not np.isfinite(r) else float(r) for r in resolutions]
    general = {
        "rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": int(box_size),
        "rlnCurrentResolution": min(res) if res else UNKNOWN_RESOLUTION, "rlnCurrentImageSize": int(box_size),
        "rlnPixelSize": float(apix), "rlnNrClasses": len(references), "rlnNrBodies": 1, "rlnNrGroups": 1,
    }
    classes = pd.DataFrame({
        "rlnReferenceImage": list(references), "rlnClassDistribution": [float(f) for f in fractions],
        "rlnEstimatedResolution": res,
    })
    with atomic_path(path) as tmp:
        starfile.write({"model_general": general, "model_classes": classes}, tmp, float_format="%.6f")
    return Path(path)


def write_chimerax_script(path: Path, groups: Sequence[dict], series: Sequence[dict] = ()) -> Path:
    """A ChimeraX command script: each group opens its ``maps`` and ``models`` (paths relative to the script,
    or absolute), each series opens its maps as one volume series (``vseries true``) or a multi-model PDB
    (``coordset`` plays it). ChimeraX runs a ``.cxc`` from the script's folder, so relative paths hold.

    groups: dicts ``name``, ``maps`` [paths], ``models`` [paths]; series: dicts ``name``, ``maps`` or ``model``.
    Maps and models share one frame (io/mrc.py writes the box centre at (0, 0, 0) Å, where models sit).
    """
    lines = ["# cryobench_lab: open in ChimeraX with `open " + Path(path).name + "`", "close session"]
    model_id = 0
    for g in groups:
        lines.append(f"# {g['name']}")
        for p in [*g.get("maps", ()), *g.get("models", ())]:
            model_id += 1
            lines.append(f"open {_quote(p)}")
    for s in series:
        lines.append(f"# {s['name']} (series)")
        model_id += 1
        if s.get("maps"):
            lines.append("open " + " ".join(_quote(p) for p in s["maps"]) + " vseries true")
        else:
            lines.append(f"open {_quote(s['model'])}")
            lines.append(f"coordset #{model_id} 1,")
    lines += ["volume all style surface", "view"]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return Path(path)


def _quote(p) -> str:
    return f'"{p}"' if " " in str(p) else str(p)


def save_latents(path: Path, z) -> Path:
    """cryoDRGN's ``z.pkl``: a float32 numpy array (N, zdim), pickled."""
    z = z.detach().cpu().numpy() if hasattr(z, "detach") else np.asarray(z)
    save_pickle(path, np.ascontiguousarray(z, dtype=np.float32).reshape(len(z), -1))
    return Path(path)


def portable_stack(stack: Path, star_dir: Path, volatile: Path | None = None) -> str:
    """The path to write for ``stack`` in a star file in ``star_dir`` that still resolves after a clean of
    the ``volatile`` folder (the dataset cache).

    A stack inside ``volatile`` is hard-linked into ``star_dir/stacks/`` (copied when the file systems
    differ: a hard link costs no space, a copy does); every path is written relative to ``star_dir``.
    """
    stack, star_dir = Path(stack).resolve(), Path(star_dir).resolve()
    if volatile is not None and stack.is_relative_to(Path(volatile).resolve()):
        local = star_dir / "stacks" / stack.name
        if not local.exists() or local.stat().st_size != stack.stat().st_size:
            local.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(local) as tmp:
                tmp.unlink()  # os.link needs a free name
                try:
                    os.link(stack, tmp)
                except OSError:  # another file system, or no hard links there
                    shutil.copyfile(stack, tmp)
        stack = local
    return os.path.relpath(stack, star_dir)
