"""The evaluation protocols every method is scored with, and the metric keys they report.

A method is seen only through ``decode_fn(latent (M, d) | None, classes (M,) int64) -> volumes (M, D, D, D)``
(``ReconstructionModule.decode``) and its per-image outputs ``latent`` ((N, d), per-class (N, K, d) or
None) and ``class_probs`` ((N, K) or None), evaluated on the images whose ground-truth states are
``labels`` (N,) (−1 = unknown, skipped). ``gt_volumes[s]`` is state s's ground-truth volume; ``apix`` Å/px.
Row ``i`` of labels/latent/class_probs is image ``i`` everywhere (``image`` fields refer to these rows).

Metric keys — the same for every method; the evaluation callback prefixes the split (``val/``):

=========================  =====  ====================================================================
key                        unit   meaning
=========================  =====  ====================================================================
``fsc_auc_mean``           —      per-conformation FSC-AUC (cycles/px × FSC, unmasked max ≈ 0.49 at
                                  D=128), mean over ground-truth states (CryoBench leaderboard number)
``fsc_auc_std``            —      its standard deviation over states (population, ddof = 0)
``fsc_auc_median``         —      its median over states
``fsc_res_0.5``            Å      resolution where each state's FSC first drops below 0.5 (CryoBench
                                  convention, Nyquist 2·apix if never), mean over states
``fsc_res_0.143``          Å      the same at 0.143
``fsc_image_auc_mean``     —      per-image FSC-AUC on |FSC| (CryoBench's current default), mean over
                                  ~n evenly spaced images
``fsc_image_auc_std``      —      its standard deviation over those images (ddof = 0)
``fsc_image_auc_median``   —      its median
``ari``                    —      adjusted Rand index, assigned class (argmax) vs ground-truth state
``nmi``                    —      normalised mutual information (arithmetic normalisation), same pairs
``n_empty_classes``        count  classes to which no image is assigned
``class_sizes``            list   images per class (K ints)
``distance_corr``          —      Pearson r of predicted vs true inter-group centre distances (atoms)
``clashes_mean``           count  Cα pairs < 4 Å (same-chain neighbours excluded) per predicted structure
=========================  =====  ====================================================================

Non-scalar companions written to ``metrics.json``: ``per_state`` (per-state ``state``, ``class``,
``image``, ``auc``, ``res_0.5``, ``res_0.143``, ``freq`` cycles/px, ``curve``), ``per_image`` (``image``,
``state``, ``class``, ``auc``), ``confusion`` (S × K), ``clashes`` (per structure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.metrics.conformations import representatives
from cryobench_lab.metrics.fsc import fsc, fsc_auc, fsc_summary
from cryobench_lab.metrics.latent import assigned_latent

#: Every scalar (or list) key a protocol may report, → one-line meaning (mirrors the table above).
METRIC_KEYS: dict[str, str] = {
    "fsc_auc_mean": "per-conformation FSC-AUC, mean over states",
    "fsc_auc_std": "per-conformation FSC-AUC, std over states",
    "fsc_auc_median": "per-conformation FSC-AUC, median over states",
    "fsc_res_0.5": "FSC=0.5 resolution (Å, CryoBench first-below), mean over states",
    "fsc_res_0.143": "FSC=0.143 resolution (Å, CryoBench first-below), mean over states",
    "fsc_image_auc_mean": "per-image FSC-AUC on |FSC|, mean over sampled images",
    "fsc_image_auc_std": "per-image FSC-AUC on |FSC|, std over sampled images",
    "fsc_image_auc_median": "per-image FSC-AUC on |FSC|, median over sampled images",
    "ari": "adjusted Rand index, assigned class vs ground-truth state",
    "nmi": "normalised mutual information, assigned class vs ground-truth state",
    "n_empty_classes": "classes with no assigned image",
    "class_sizes": "images per class",
    "distance_corr": "Pearson r, predicted vs true inter-group distances",
    "clashes_mean": "Cα clashes (< 4 Å, neighbours excluded) per predicted structure",
}

DecodeFn = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]


def _check_inputs(labels, latent, class_probs, gt_volumes):
    labels = torch.as_tensor(labels).long()
    latent = None if latent is None else torch.as_tensor(latent)
    class_probs = None if class_probs is None else torch.as_tensor(class_probs)
    for name, x in (("latent", latent), ("class_probs", class_probs)):
        if x is not None and len(x) != len(labels):
            raise InputError(f"{name} has {len(x)} rows but labels has {len(labels)}; pass one row per image")
    known = labels[labels >= 0]
    if known.numel() == 0:
        raise InputError(
            "labels: no image has a ground-truth state (all < 0); per-state FSC needs labels >= 0"
        )
    if int(known.max()) >= len(gt_volumes):
        raise InputError(
            f"labels: state {int(known.max())} has no ground-truth volume ({len(gt_volumes)} given); "
            "pass one volume per state, indexed by label"
        )
    return labels, latent, class_probs


def _mask_for(mask, state: int):
    """One mask (D, D, D) for every state, or per-state masks (S, D, D, D)."""
    if mask is None:
        return None
    return mask[state] if np.ndim(mask) == 4 else mask


def _decode_batched(
    decode_fn: DecodeFn, latent: torch.Tensor | None, classes: torch.Tensor, batch_size: int
) -> Iterator[torch.Tensor]:
    """Yield the decoded volumes (D, D, D) on the CPU one by one, calling ``decode_fn`` on batches."""
    for start in range(0, len(classes), batch_size):
        z = None if latent is None else latent[start : start + batch_size]
        # no_grad only around the call: a context held open across `yield` would leak into the caller
        with torch.no_grad():
            vols = decode_fn(z, classes[start : start + batch_size]).detach().cpu()  # (b, D, D, D)
        yield from vols


def _spread(values, prefix: str) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        f"{prefix}_mean": float(v.mean()),
        f"{prefix}_std": float(v.std()),
        f"{prefix}_median": float(np.median(v)),
    }


def per_conformation_fsc(
    decode_fn: DecodeFn,
    labels,
    latent,
    class_probs,
    gt_volumes,
    apix: float,
    mask=None,
    batch_size: int = 8,
    on_volume: Callable[[int, torch.Tensor], None] | None = None,
) -> dict:
    """CryoBench's per-conformation FSC: one decoded volume per ground-truth state.

    For each state, :func:`~cryobench_lab.metrics.conformations.representatives` picks the image whose
    latent (in its assigned class) is nearest the state's mean latent; that (latent, class) is decoded and
    compared with ``gt_volumes[state]`` (FSC of metrics/fsc.py, optionally under ``mask``: (D, D, D) for all
    states or (S, D, D, D) per state). ``on_volume(state, volume (D, D, D))`` is called with each decoded
    volume (e.g. to write it), so the caller never decodes twice. Decoding runs ``batch_size`` at a time.

    Returns ``fsc_auc_mean``, ``fsc_auc_std``, ``fsc_auc_median``, ``fsc_res_0.5``, ``fsc_res_0.143`` (Å)
    and ``per_state`` (list of dicts: state, class, image, auc, res_0.5, res_0.143, freq, curve).
    """
    labels, latent, class_probs = _check_inputs(labels, latent, class_probs, gt_volumes)
    reps = representatives(labels, latent, class_probs)
    z = None if latent is None else torch.stack([r["latent"] for r in reps])  # (S, d)
    classes = torch.tensor([r["class"] for r in reps], dtype=torch.long)  # (S,)
    per_state = []
    for rep, vol in zip(reps, _decode_batched(decode_fn, z, classes, batch_size)):
        s = rep["state"]
        summary = fsc_summary(vol, gt_volumes[s], apix=apix, mask=_mask_for(mask, s))
        per_state.append({"state": s, "class": rep["class"], "image": rep["image"], **summary})
        if on_volume is not None:
            on_volume(s, vol)
    return {
        **_spread([p["auc"] for p in per_state], "fsc_auc"),
        "fsc_res_0.5": float(np.mean([p["res_0.5"] for p in per_state])),
        "fsc_res_0.143": float(np.mean([p["res_0.143"] for p in per_state])),
        "per_state": per_state,
    }


def per_image_fsc(
    decode_fn: DecodeFn,
    labels,
    latent,
    class_probs,
    gt_volumes,
    apix: float,
    n: int = 100,
    mask=None,
    batch_size: int = 8,
) -> dict:
    """CryoBench's per-image FSC: about ``n`` evenly spaced images, each decoded at its own latent.

    Among the images with a known state (label >= 0), every s-th one (s = N_known // n, at least 1; the
    first n of those) is decoded at its latent in its assigned class (argmax ``class_probs``; class 0
    without classes) and compared with the ground-truth volume of its label. The AUC is taken on |FSC|,
    as CryoBench's current code does. ``apix`` is accepted for a uniform call signature with
    :func:`per_conformation_fsc` (AUC is in cycles/px and needs no pixel size).

    Returns ``fsc_image_auc_mean``, ``fsc_image_auc_std``, ``fsc_image_auc_median`` and ``per_image``
    (list of dicts: image, state, class, auc).
    """
    labels, latent, class_probs = _check_inputs(labels, latent, class_probs, gt_volumes)
    known = torch.nonzero(labels >= 0).squeeze(1)  # (N_known,)
    pick = known[:: max(len(known) // n, 1)][:n]  # (n,)
    all_classes = (
        class_probs.argmax(1) if class_probs is not None else torch.zeros(len(labels), dtype=torch.long)
    )
    classes = all_classes[pick]
    states = labels[pick]
    if latent is None:
        # Without latents a volume depends only on its class: decode each class once and score each
        # (class, state) pair once.
        pairs = sorted(set(zip(classes.tolist(), states.tolist())))
        uniq = sorted({c for c, _ in pairs})
        vols = dict(zip(uniq, _decode_batched(decode_fn, None, torch.tensor(uniq), batch_size)))
        auc = {(c, s): fsc_auc(*_abs_fsc(vols[c], gt_volumes[s], _mask_for(mask, s))) for c, s in pairs}
        aucs = [auc[(c, s)] for c, s in zip(classes.tolist(), states.tolist())]
    else:
        z = assigned_latent(latent, class_probs)[pick]  # (n, d)
        aucs = [
            fsc_auc(*_abs_fsc(vol, gt_volumes[s], _mask_for(mask, s)))
            for vol, s in zip(_decode_batched(decode_fn, z, classes, batch_size), states.tolist())
        ]
    per_image = [
        {"image": int(i), "state": int(s), "class": int(c), "auc": a}
        for i, s, c, a in zip(pick.tolist(), states.tolist(), classes.tolist(), aucs)
    ]
    return {**_spread(aucs, "fsc_image_auc"), "per_image": per_image}


def _abs_fsc(vol, gt, mask):
    freq, curve = fsc(vol, gt, mask)
    return freq, np.abs(curve)
