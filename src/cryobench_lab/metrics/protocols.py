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
``distance_corr``          —      mean of the ``dist_corr_<a>_<b>`` below (atoms; NaN without groups)
``clashes_mean``           count  Cα pairs < 4 Å (same-chain neighbours excluded) per predicted structure
``clashes_median``         count  its median over the predicted structures (≤ 500 evenly spaced images)
``clashes_true_median``    count  the same count on each image's true structure (the floor to compare with)
``dist_corr_<a>_<b>``      —      Pearson r over images of the centre distance of residue groups a and b
                                  (``data.domains`` vs ``CORE``, else chain pairs), predicted vs true
``segmentation_ari``       —      ARI between the model's residue segments and the residue groups
=========================  =====  ====================================================================

Atom keys (``distance_corr`` … ``segmentation_ari``) are written when the data carry per-state atomic
models (``gt_structures``); ``distance_corr`` is then the mean of the ``dist_corr_<a>_<b>``. A metric a
method cannot produce (classification without classes, atom metrics without atoms) is NaN under the same
key (callbacks/evaluation.py), so every method writes the same keys on a dataset.

When the dataset ships its own FSC mask (CryoBench's ``init_mask/mask.mrc``), the same volumes are also
scored under it (CryoBench's masked variant) and every ``fsc_*`` key is repeated with a ``_masked`` suffix:
``fsc_auc_mean_masked``, ``fsc_auc_std_masked``, ``fsc_auc_median_masked``, ``fsc_res_0.5_masked``,
``fsc_res_0.143_masked``, ``fsc_image_auc_mean_masked``, ``fsc_image_auc_std_masked``,
``fsc_image_auc_median_masked``.

Every dataset with ground-truth volumes is also scored under one ground-truth-support mask (the union over
the states, at most 200 evenly spaced, of each volume thresholded at half its 99.99th percentile, dilated
3 px, 3 px cosine edge): every ``fsc_*`` key again with a ``_gtmask`` suffix: ``fsc_auc_mean_gtmask``, ``fsc_auc_std_gtmask``,
``fsc_auc_median_gtmask``, ``fsc_res_0.5_gtmask``, ``fsc_res_0.143_gtmask``, ``fsc_image_auc_mean_gtmask``,
``fsc_image_auc_std_gtmask``, ``fsc_image_auc_median_gtmask``. Beside them the reference reconstructions of
callbacks/references.py, scored on the same data against every state (NaN where they cannot be computed, e.g.
without poses; ``_masked`` only where the dataset ships a mask): ``floor_fsc_auc_mean``,
``floor_fsc_auc_std``, ``floor_fsc_auc_median``, ``floor_fsc_auc_mean_gtmask``, ``floor_fsc_auc_std_gtmask``,
``floor_fsc_auc_median_gtmask``, ``floor_fsc_auc_mean_masked``, ``floor_fsc_auc_std_masked``,
``floor_fsc_auc_median_masked``, ``oracle_fsc_auc_mean``, ``oracle_fsc_auc_std``, ``oracle_fsc_auc_median``,
``oracle_fsc_auc_mean_gtmask``, ``oracle_fsc_auc_std_gtmask``, ``oracle_fsc_auc_median_gtmask``,
``oracle_fsc_auc_mean_masked``, ``oracle_fsc_auc_std_masked``, ``oracle_fsc_auc_median_masked``.

Non-scalar companions written to ``metrics.json``: ``per_state`` (per-state ``state``, ``class``,
``image``, ``auc``, ``res_0.5``, ``res_0.143``, ``freq`` cycles/px, ``curve``), ``per_image`` (``image``,
``state``, ``class``, ``auc``), ``confusion`` (S × K), ``clashes`` (per structure), ``references``
(per-state AUCs of the floor and the oracle under each mask).
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
    "distance_corr": "mean of the dist_corr_<a>_<b> (Pearson r of group centre distances)",
    "clashes_mean": "Cα clashes (< 4 Å, neighbours excluded) per predicted structure",
    "clashes_median": "Cα clashes per predicted structure, median",
    "clashes_true_median": "Cα clashes per true structure of the same images, median",
    "dist_corr_<a>_<b>": "Pearson r over images of the centre distance of residue groups a, b (a pattern)",
    "segmentation_ari": "ARI between the model's residue segments and the residue groups",
}
#: CryoBench reports FSCs unmasked and masked (its ``--mask init_mask/mask.mrc``); a dataset that ships a mask
#: gets each FSC key again with this suffix, computed from the same decoded volumes under that mask.
MASKED = "masked"
#: Every dataset with ground-truth volumes also gets each FSC key with this suffix, under the union of the
#: ground-truth supports (metrics/masks.py ``support_mask``), so that an empty solvent is not what wins.
GTMASK = "gtmask"
_FSC_KEYS = {k: v for k, v in METRIC_KEYS.items() if k.startswith("fsc_")}
METRIC_KEYS.update({f"{k}_{MASKED}": f"{v}, under the dataset's own mask" for k, v in _FSC_KEYS.items()})
METRIC_KEYS.update({f"{k}_{GTMASK}": f"{v}, under the ground-truth-support mask" for k, v in _FSC_KEYS.items()})
#: Reference reconstructions scored beside every method (callbacks/references.py): ``floor`` (consensus of all
#: images, no labels) and ``oracle`` (per state, given the truth), per-state FSC-AUC against every state.
REFERENCE_KEYS = {
    f"{ref}_fsc_auc_{stat}{suffix}": f"{meaning}, FSC-AUC {stat} over states{where}"
    for ref, meaning in (("floor", "consensus floor (all images, true poses/CTF, no labels)"),
                         ("oracle", "oracle given the truth (labels, poses, CTF, per-shell SSNR)"))
    for stat in ("mean", "std", "median")
    for suffix, where in (("", ""), (f"_{GTMASK}", ", ground-truth-support mask"), (f"_{MASKED}", ", dataset mask"))
}
METRIC_KEYS.update(REFERENCE_KEYS)

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
    variants: dict | None = None,
) -> dict:
    """CryoBench's per-conformation FSC: one decoded volume per ground-truth state.

    For each state, :func:`~cryobench_lab.metrics.conformations.representatives` picks the image whose
    latent (in its assigned class) is nearest the state's mean latent; that (latent, class) is decoded and
    compared with ``gt_volumes[state]`` (FSC of metrics/fsc.py, optionally under ``mask``: (D, D, D) for all
    states or (S, D, D, D) per state). ``on_volume(state, volume (D, D, D))`` is called with each decoded
    volume (e.g. to write it), so the caller never decodes twice. Decoding runs ``batch_size`` at a time.
    ``variants`` ({suffix: mask}) scores the same volumes again under other masks (e.g. CryoBench's masked
    FSC with the dataset's ``init_mask``), adding ``fsc_auc_mean_<suffix>`` etc. and per-state ``auc_<suffix>``.

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
        gt = gt_volumes[s]
        summary = fsc_summary(vol, gt, apix=apix, mask=_mask_for(mask, s))
        for suffix, other in (variants or {}).items():
            extra = fsc_summary(vol, gt, apix=apix, mask=_mask_for(other, s))
            summary.update({f"{key}_{suffix}": extra[key] for key in ("auc", "res_0.5", "res_0.143")})
        per_state.append({"state": s, "class": rep["class"], "image": rep["image"], **summary})
        if on_volume is not None:
            on_volume(s, vol)
    out = {}
    for suffix in [""] + [f"_{v}" for v in variants or {}]:
        out.update({f"{k}{suffix}": v for k, v in _spread([p[f"auc{suffix}"] for p in per_state], "fsc_auc").items()})
        out[f"fsc_res_0.5{suffix}"] = float(np.mean([p[f"res_0.5{suffix}"] for p in per_state]))
        out[f"fsc_res_0.143{suffix}"] = float(np.mean([p[f"res_0.143{suffix}"] for p in per_state]))
    return {**out, "per_state": per_state}


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
    variants: dict | None = None,
) -> dict:
    """CryoBench's per-image FSC: about ``n`` evenly spaced images, each decoded at its own latent.

    Among the images with a known state (label >= 0), every s-th one from the first (s = N_known // n, at
    least 1) is decoded at its latent in its assigned class (argmax ``class_probs``; class 0 without
    classes) and compared with the ground-truth volume of its label. That is CryoBench's
    ``np.arange(0, N, N // n)``: about n images, more when N is not a multiple of n (N=335,240 and n=100
    give 101). The AUC is taken on |FSC|, as CryoBench's current code does. ``variants`` ({suffix: mask})
    adds ``fsc_image_auc_mean_<suffix>`` etc. and per-image ``auc_<suffix>`` from the same volumes. ``apix`` is accepted for a uniform call signature with
    :func:`per_conformation_fsc` (AUC is in cycles/px and needs no pixel size).

    Returns ``fsc_image_auc_mean``, ``fsc_image_auc_std``, ``fsc_image_auc_median`` and ``per_image``
    (list of dicts: image, state, class, auc).
    """
    labels, latent, class_probs = _check_inputs(labels, latent, class_probs, gt_volumes)
    masks = {"auc": mask, **{f"auc_{k}": m for k, m in (variants or {}).items()}}
    known = torch.nonzero(labels >= 0).squeeze(1)  # (N_known,)
    pick = known[:: max(len(known) // n, 1)]  # (≈ n,)
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
        auc = {(c, s): _image_aucs(vols[c], gt_volumes[s], s, masks) for c, s in pairs}
        aucs = [auc[(c, s)] for c, s in zip(classes.tolist(), states.tolist())]
    else:
        z = assigned_latent(latent, class_probs)[pick]  # (n, d)
        aucs = [
            _image_aucs(vol, gt_volumes[s], s, masks)
            for vol, s in zip(_decode_batched(decode_fn, z, classes, batch_size), states.tolist())
        ]
    per_image = [
        {"image": int(i), "state": int(s), "class": int(c), **a}
        for i, s, c, a in zip(pick.tolist(), states.tolist(), classes.tolist(), aucs)
    ]
    out = {}
    for key in masks:
        spread = _spread([a[key] for a in aucs], "fsc_image_auc")
        out.update({f"{k}{key[3:]}": v for k, v in spread.items()})
    return {**out, "per_image": per_image}


def _image_aucs(vol, gt, state: int, masks: dict) -> dict:
    """``{"auc": …, "auc_<suffix>": …}``: AUC on |FSC| of one decoded volume under each mask."""
    return {key: fsc_auc(*_abs_fsc(vol, gt, _mask_for(m, state))) for key, m in masks.items()}


def _abs_fsc(vol, gt, mask):
    freq, curve = fsc(vol, gt, mask)
    return freq, np.abs(curve)
