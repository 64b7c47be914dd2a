"""Figures for evaluation runs (PNG): FSC curves, latent embeddings, confusion matrix, class sizes, volumes.

Every figure has labelled axes with units, a legend or a colour bar, and a title. Figures are built on
matplotlib's object-oriented ``Figure`` (Agg canvas), so nothing here touches pyplot's global state or
the user's interactive backend. Each function writes ``path`` (parent folders created) and returns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cryobench_lab.io.atomic import atomic_path

#: up to this many states/labels get a legend with one distinct colour each; more get a colour bar
MAX_LEGEND = 10


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def save_figure(fig: Figure, path, dpi: float | None = None) -> Path:
    """Save ``fig`` as ``path`` (format from the suffix) through a temporary file and a rename."""
    path = Path(path)
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix that picks the format
        fig.savefig(tmp, dpi=dpi or fig.dpi, bbox_inches="tight")
    return path


def _state_colours(n: int):
    """Distinct colours for up to MAX_LEGEND items, else samples of a sequential map."""
    if n <= MAX_LEGEND:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(n - 1, 1)) for i in range(n)]


def plot_fsc_curves(
    path, curves: Sequence[dict], apix: float, title: str = "FSC against ground truth"
) -> Path:
    """FSC curves, one per state, against spatial frequency (1/Å, bottom; resolution Å, top).

    curves: dicts with ``state``, ``freq`` (cycles/px) and ``curve`` (as in ``per_state``). Dashed lines
    mark FSC = 0.5 and 0.143. Up to MAX_LEGEND states get a legend with their AUC; more are coloured by
    state with a colour bar, and their mean curve is drawn in black.
    """
    fig = Figure(figsize=(6.4, 4.2), dpi=130, layout="constrained")
    ax = fig.add_subplot()
    many = len(curves) > MAX_LEGEND
    states = [c["state"] for c in curves]
    norm = Normalize(vmin=min(states), vmax=max(max(states), min(states) + 1))
    colours = [colormaps["viridis"](norm(s)) for s in states] if many else _state_colours(len(curves))
    for c, colour in zip(curves, colours):
        freq, fsc = np.asarray(c["freq"]) / apix, np.asarray(c["curve"])
        label = f"state {c['state']}" + (f" (AUC {c['auc']:.3f})" if "auc" in c else "")
        ax.plot(freq, fsc, lw=0.7 if many else 1.2, color=colour, label=None if many else label)
    if many:
        mean = np.mean([np.asarray(c["curve"]) for c in curves], axis=0)
        ax.plot(
            np.asarray(curves[0]["freq"]) / apix,
            mean,
            color="black",
            lw=2,
            label=f"mean of {len(curves)} states",
        )
        fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="ground-truth state", pad=0.02)
    ax.axhline(0.5, color="0.3", ls="--", lw=0.9, label="FSC = 0.5")
    ax.axhline(0.143, color="0.3", ls=":", lw=0.9, label="FSC = 0.143")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    nyquist = 0.5 / apix
    ax.set_xlim(0, nyquist)
    # Top axis: the same positions labelled with their resolution 1/f (Å).
    top = ax.secondary_xaxis("top")
    ticks = np.linspace(0, nyquist, 6)[1:]
    top.set_xticks(ticks, [f"{1 / f:.1f}" for f in ticks])
    top.set_xlabel("resolution (Å)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # FSC curves start at 1 on the left, so the lower left corner is free for the legend.
    ax.legend(fontsize=7, loc="lower left", ncol=1 if len(curves) <= 5 else 2)
    return save_figure(fig, path)


def plot_latent(
    path,
    embedding,
    labels=None,
    axis_labels: Sequence[str] = ("PC1", "PC2"),
    title: str = "Latent space",
    max_points: int = 20000,
    classes=None,
) -> Path:
    """Scatter of a 2D embedding (N, 2) coloured by ground-truth state; (N, 1) is drawn against the state.

    labels (N,) ints or None; classes (N,) the model's assigned classes or None. With both, two panels side
    by side (predicted class | true state): a mixture's per-class latents overlap between classes, so the
    state colours alone look mixed even when every image is classified right. Up to MAX_LEGEND distinct
    values get a legend, more a colour bar. Above ``max_points`` an evenly spaced subset is drawn (the title
    says so) to keep the figure light.
    """
    emb = _np(embedding).astype(np.float64)
    emb = emb[:, None] if emb.ndim == 1 else emb
    lab = None if labels is None else _np(labels).astype(np.int64)
    cls = None if classes is None else _np(classes).astype(np.int64)
    n_total = len(emb)
    if n_total > max_points:
        keep = np.linspace(0, n_total - 1, max_points).astype(np.int64)
        emb = emb[keep]
        lab, cls = (None if a is None else a[keep] for a in (lab, cls))
        title = f"{title} ({max_points} of {n_total} images)"
    panels = [(a, name) for a, name in ((cls, "predicted class"), (lab, "ground-truth state")) if a is not None]
    panels = panels or [(None, "")]
    fig = Figure(figsize=(5.6 * len(panels), 4.6), dpi=130, layout="constrained")
    for i, (values, name) in enumerate(panels):
        _latent_panel(fig.add_subplot(1, len(panels), i + 1), fig, emb, values, name, axis_labels,
                      title if len(panels) == 1 else f"{title}: coloured by {name}")
    return save_figure(fig, path)


def _latent_panel(ax, fig, emb, lab, name: str, axis_labels, title: str) -> None:
    one_d = emb.shape[1] == 1
    if one_d:
        rng = np.random.default_rng(0)  # vertical jitter separates overlapping points of one value
        y = (lab if lab is not None else np.zeros(len(emb))) + rng.uniform(-0.25, 0.25, len(emb))
        emb = np.column_stack([emb[:, 0], y])
    size = max(2.0, 30.0 / np.sqrt(max(len(emb), 1) / 100))
    word = "class" if name == "predicted class" else "state"
    if lab is None:
        ax.scatter(emb[:, 0], emb[:, 1], s=size, alpha=0.6, lw=0, color="tab:blue", label="images")
        ax.legend(fontsize=8, markerscale=2)
    else:
        values = np.unique(lab)
        if len(values) <= MAX_LEGEND:
            for v, colour in zip(values, _state_colours(len(values))):
                sel = lab == v
                ax.scatter(emb[sel, 0], emb[sel, 1], s=size, alpha=0.6, lw=0, color=colour, label=f"{word} {v}")
            ax.legend(fontsize=7, markerscale=2, title=name, title_fontsize=7, loc="best")
        else:
            sc = ax.scatter(emb[:, 0], emb[:, 1], c=lab, s=size, alpha=0.7, lw=0, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=name)
    ax.set_xlabel(axis_labels[0])
    if one_d:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name or 'image'} (jittered)")
    else:
        ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize=9)


def plot_confusion(
    path,
    confusion,
    title: str = "Classes vs ground-truth states",
    class_names: Sequence[str] | None = None,
    state_names: Sequence[str] | None = None,
) -> Path:
    """Confusion matrix (S states × K classes) as image counts, annotated in each cell when it fits.

    Rows are ground-truth states, columns predicted classes; the colour bar counts images.
    """
    cm = _np(confusion).astype(np.int64)
    S, K = cm.shape
    fig = Figure(
        figsize=(max(4.0, min(1.2 + 0.55 * K, 12) + 1.2), min(1.0 + 0.45 * S, 8) + 0.6),
        dpi=130,
        layout="constrained",
    )
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", aspect="auto", vmin=0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="images", shrink=0.8)
    if S * K <= 400:
        vmax = cm.max() if cm.max() > 0 else 1
        for i in range(S):
            for j in range(K):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if cm[i, j] > 0.6 * vmax else "black",
                )
    step_k, step_s = max(1, K // 20), max(1, S // 20)
    ax.set_xticks(range(0, K, step_k), class_names[::step_k] if class_names else range(0, K, step_k))
    ax.set_yticks(range(0, S, step_s), state_names[::step_s] if state_names else range(0, S, step_s))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth state")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_class_sizes(path, class_sizes, confusion=None, title: str = "Images per class") -> Path:
    """Bar chart of images per predicted class; stacked by ground-truth state when ``confusion`` (S × K)
    is given and S <= MAX_LEGEND. Empty classes are marked "empty"."""
    sizes = _np(class_sizes).astype(np.int64)
    K = len(sizes)
    fig = Figure(figsize=(max(4.0, 1.5 + 0.45 * K), 3.6), dpi=130, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(K)
    cm = None if confusion is None else _np(confusion).astype(np.int64)
    if cm is not None and len(cm) <= MAX_LEGEND:
        bottom = np.zeros(K)
        for s, colour in zip(range(len(cm)), _state_colours(len(cm))):
            ax.bar(x, cm[s], bottom=bottom, color=colour, label=f"state {s}")
            bottom += cm[s]
        unlabelled = sizes - bottom
        if (unlabelled > 0).any():
            ax.bar(x, unlabelled, bottom=bottom, color="0.7", label="unknown state")
        ax.legend(fontsize=7, title="ground truth", title_fontsize=7)
    else:
        ax.bar(x, sizes, color="tab:blue", label="images")
        ax.legend(fontsize=7)
    for k in np.flatnonzero(sizes == 0):
        ax.text(k, 0, "empty", ha="center", va="bottom", rotation=90, fontsize=7, color="tab:red")
    step = max(1, K // 25)
    ax.set_xticks(x[::step])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("images")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_volume_montage(
    path,
    volumes,
    titles: Sequence[str] | None = None,
    apix: float | None = None,
    title: str = "Central slices and projections",
) -> Path:
    """One row per volume (S, D, D, D): central slices z = 0 (x–y plane), y = 0 (x–z), x = 0 (y–z) and the
    projection along z. Each row has its own grey scale (colour bar, density in the volume's units);
    axes are in Å when ``apix`` is given, else in pixels, centred on the box centre. Each row is ~2.5 in
    tall: pass a handful of volumes, not every state of a 100-state dataset."""
    vols = _np(volumes).astype(np.float32)
    vols = vols[None] if vols.ndim == 3 else vols
    S, D = len(vols), vols.shape[-1]
    c = D // 2
    unit, scale = ("Å", apix) if apix else ("px", 1.0)
    lo_edge, hi_edge = (-(D // 2) - 0.5) * scale, (D - D // 2 - 0.5) * scale
    extent = (lo_edge, hi_edge, lo_edge, hi_edge)  # pixel j's centre sits at its coordinate (j − D//2)·scale
    fig = Figure(figsize=(11.0, 2.5 * S + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(S, 4, squeeze=False)
    columns = [
        ("slice z = 0", "x", "y"),
        ("slice y = 0", "x", "z"),
        ("slice x = 0", "y", "z"),
        ("projection along z", "x", "y"),
    ]
    for r, vol in enumerate(vols):
        panels = [vol[c], vol[:, c, :], vol[:, :, c]]
        lo, hi = min(p.min() for p in panels), max(p.max() for p in panels)
        for k, img in enumerate(panels):
            im = axes[r, k].imshow(img, cmap="gray", origin="lower", extent=extent, vmin=lo, vmax=hi)
        fig.colorbar(im, ax=axes[r, :3].tolist(), label="density", fraction=0.02, pad=0.01)
        proj = vol.sum(0)  # (D, D) [y, x]
        imp = axes[r, 3].imshow(proj, cmap="gray", origin="lower", extent=extent)
        fig.colorbar(imp, ax=axes[r, 3], label="projected density", fraction=0.046, pad=0.03)
        name = titles[r] if titles is not None else f"volume {r}"
        for k, (col, xl, yl) in enumerate(columns):
            axes[r, k].set_title(f"{name}: {col}" if k == 0 else col, fontsize=8)
            axes[r, k].set_xlabel(f"{xl} ({unit})", fontsize=7)
            axes[r, k].set_ylabel(f"{yl} ({unit})", fontsize=7)
            axes[r, k].tick_params(labelsize=6)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_auc_vs_rmsd(path, per_state: Sequence[dict], title: str = "Per-state FSC-AUC") -> Path:
    """Each state's FSC-AUC against the base model's Cα RMSD (Å) to that state; points labelled by state.

    per_state: dicts with ``state``, ``auc`` and ``base_rmsd`` (as in ``per_state`` of metrics.json).
    """
    rmsd = np.array([p["base_rmsd"] for p in per_state], dtype=float)
    auc = np.array([p["auc"] for p in per_state], dtype=float)
    order = np.argsort(rmsd)
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.add_subplot()
    ax.plot(rmsd[order], auc[order], "-o", color="tab:blue", ms=4, label="FSC-AUC per state")
    for p in per_state:
        ax.annotate(str(p["state"]), (p["base_rmsd"], p["auc"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("Cα RMSD of the base model to the state (Å, superposed)")
    ax.set_ylabel("FSC-AUC")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
