"""Pose errors of a poses=search run read from one of its checkpoints (issue 9 benchmark).

    .venv/bin/python bench/abinit_pose_errors.py <checkpoint.ckpt | run folder> <dataset cache folder>

The dataset folder is a simulated preset's cache (``poses.pkl``, ``labels.npy``, ``meta.json``). Prints the scorer's
``pose_scores`` (median geodesic error after a global alignment per class, handedness, shift error) and, for
mixtures, the ARI of the class logits and the error per true state in its majority class.

Per state it also clusters the images' residual rotations ``R_trueᵢᵀ R_estᵢ`` (after the handedness found by
the alignment) within 10°: one cluster is a solved state; several clusters at regular angles from the largest
(e.g. 60°, 120°, 180°) are images put in symmetry-related orientations of a (pseudo)symmetric particle; no
clusters are poses not determined.
"""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.metrics.alignment import FLIP, align_rotations, pose_scores
from cryobench_lab.metrics.classes import classification_metrics
from cryobench_lab.physics.rotations import axis_angle_to_matrix, geodesic_distance


def residual_clusters(R_est: torch.Tensor, R_true: torch.Tensor, radius_deg: float = 10.0, max_clusters: int = 8) -> dict:
    """Greedy clusters of residual rotations (see the module docstring): sizes, angles (degrees) of each
    cluster centre from the largest one, and the number of images in no cluster of ≥ 2 % of them."""
    if align_rotations(R_est, R_true)["flipped"]:
        R_est = FLIP @ R_est @ FLIP
    M = (R_true.transpose(-1, -2) @ R_est).double()  # (n, 3, 3)
    left = torch.ones(len(M), dtype=torch.bool)
    centres, sizes = [], []
    while int(left.sum()) > 0.02 * len(M) and len(centres) < max_clusters:
        cand = M[left]
        c = cand[(geodesic_distance(cand[:, None], cand[None]) < radius_deg).sum(1).argmax()]
        members = left & (geodesic_distance(M, c.expand_as(M)) < radius_deg)
        if int(members.sum()) < 0.02 * len(M):
            break
        centres.append(c)
        sizes.append(int(members.sum()))
        left &= ~members
    angles = [round(float(geodesic_distance(centres[0], c))) for c in centres]
    return {"sizes": sizes, "angles_from_largest_deg": angles, "unclustered": int(left.sum())}


def main(run: str, cache: str) -> None:
    path = Path(run) if run.endswith(".ckpt") else Path(run) / "checkpoints" / "last.ckpt"
    ck = torch.load(path, map_location="cpu", weights_only=False)
    sd = ck["state_dict"]
    print("epoch", ck["epoch"])
    rot, trans = sd["poses.rot"], sd["poses.trans"]
    N, K = rot.shape[:2]
    rot = axis_angle_to_matrix(sd["poses.rot_delta.weight"].reshape(N, K, 3)) @ rot
    trans = trans + sd["poses.trans_delta.weight"]
    with open(Path(cache) / "poses.pkl", "rb") as f:
        R_true, t_frac = pickle.load(f)  # cryoDRGN pickle: shifts as a fraction of the box
    D = json.loads((Path(cache) / "meta.json").read_text())["box_size"]
    R_true = torch.as_tensor(R_true).float()
    t_true = torch.as_tensor(t_frac).float() * D
    classes = sd["tables.logits.weight"].argmax(1) if "tables.logits.weight" in sd else None
    labels = torch.as_tensor(np.load(Path(cache) / "labels.npy"))
    if classes is not None:
        print("ari", classification_metrics(classes, labels, n_classes=K)["ari"], torch.bincount(classes, minlength=K).tolist())
    print(pose_scores(rot, trans, R_true, t_true, classes))
    if classes is not None:
        for s in range(int(labels.max()) + 1):
            m = labels == s
            k = int(torch.mode(classes[m]).values)
            print("state", s, "-> class", k, pose_scores(rot[m][:, k], trans[m], R_true[m], t_true[m])["rot_error_median"],
                  "orientation clusters", residual_clusters(rot[m][:, k], R_true[m]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
