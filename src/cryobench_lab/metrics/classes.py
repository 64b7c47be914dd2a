"""Classification metrics: how predicted classes match ground-truth states (Hydra's ARI, plus NMI).

ARI and NMI come from ``torchmetrics.functional.clustering`` (invariant to how classes are numbered).
The confusion matrix has one row per ground-truth state (label value) and one column per predicted class.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.functional.clustering import adjusted_rand_score, normalized_mutual_info_score

from cryobench_lab.errors import InputError


def classification_metrics(pred, labels, n_classes: int | None = None) -> dict:
    """ARI, NMI, confusion matrix and class occupancy of predicted classes against ground-truth labels.

    pred: (N,) int predicted class per image, or (N, K) class probabilities (argmax taken; K sets
    ``n_classes``). labels: (N,) int ground-truth states; images with label < 0 (unknown) are left out of
    ARI, NMI and the confusion matrix but still count in ``class_sizes``. n_classes: number of classes the
    model has (default ``max(pred) + 1``); needed to see empty classes beyond the largest used index.

    Returns a JSON-friendly dict:
    ``ari``, ``nmi`` (arithmetic-mean normalisation; 1.0 when both labellings are a single group),
    ``confusion`` (S × K nested list of image counts, S = max(label) + 1, row = state, column = class),
    ``class_sizes`` (K ints), ``n_empty_classes`` (classes with no image).
    """
    pred = torch.as_tensor(pred)
    labels = torch.as_tensor(labels).long()
    if pred.dim() == 2:
        n_classes = pred.shape[1] if n_classes is None else n_classes
        pred = pred.argmax(1)
    pred = pred.long()
    if pred.shape != labels.shape or pred.dim() != 1:
        raise InputError(
            f"classification_metrics: pred {tuple(pred.shape)} and labels {tuple(labels.shape)} differ; "
            "pass one class per image (N,) or class probabilities (N, K) for the same N images as the labels"
        )
    K = int(pred.max()) + 1 if n_classes is None else int(n_classes)
    if pred.min() < 0 or pred.max() >= K:
        raise InputError(f"classification_metrics: predicted classes must lie in 0..{K - 1} (n_classes={K})")
    known = labels >= 0
    if not known.any():
        raise InputError(
            "classification_metrics: no image has a ground-truth label (all < 0); pass labels >= 0"
        )
    p, t = pred[known], labels[known]
    S = int(t.max()) + 1
    confusion = torch.zeros(S, K, dtype=torch.int64)
    confusion.index_put_((t, p), torch.ones_like(t), accumulate=True)
    if p.unique().numel() == 1 and t.unique().numel() == 1:
        # One group on both sides agrees perfectly; torchmetrics' NMI returns 0 here (0/0 entropy).
        ari = nmi = 1.0
    else:
        with warnings.catch_warnings():
            # torchmetrics builds its contingency table as a sparse tensor; torch then warns about skipped
            # sparse-invariant checks on every call, which is noise in evaluation logs.
            warnings.filterwarnings("ignore", message="Sparse invariant checks")
            ari = float(adjusted_rand_score(p, t))
            nmi = float(normalized_mutual_info_score(p, t))
    sizes = torch.bincount(pred, minlength=K)
    return {
        "ari": ari,
        "nmi": nmi,
        "confusion": confusion.tolist(),
        "class_sizes": sizes.tolist(),
        "n_empty_classes": int((sizes == 0).sum()),
    }
