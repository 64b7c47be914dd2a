"""Reference reconstructions scored beside every method, so every run reports method vs floor vs oracle.

- ``floor``: the consensus, one homogeneous reconstruction of ALL images (true poses and CTF, no labels, no
  ground truth; Wiener filter from the half-map FSC), scored against every state. A heterogeneity method
  that does not beat it has learnt nothing about heterogeneity.
- ``oracle``: one reconstruction per state given the truth (labels, poses, CTF, per-shell SSNR from the
  ground-truth spectrum). A reference, not an upper bound: methods that pool states or carry priors can
  beat it.

Their settings are those of conf/model/consensus.yaml and conf/model/oracle.yaml (models/backproject.py).
Each costs one backprojection pass over the particles. The oracle needs ``S · 2 · (pad·D)³`` complex and
real accumulators; beyond ``MAX_ORACLE_BYTES`` it is skipped (NaN) with a note.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from cryobench_lab.metrics.fsc import fsc_summary
from cryobench_lab.models.backproject import Backprojection

SETTINGS = {
    "floor": dict(name="consensus", use_labels=False, pad=1, wiener="fsc", gridding_correction=False),
    "oracle": dict(name="oracle", use_labels=True, pad=1, wiener="oracle", gridding_correction=False),
}
MAX_ORACLE_BYTES = 4 << 30
STATS = ("mean", "std", "median")


@torch.no_grad()
def reference_volumes(datamodule, which: str) -> torch.Tensor:
    """Volumes ``(K, D, D, D)`` of reference ``which`` (K = 1 for the floor, one per state for the oracle)."""
    model = Backprojection(datamodule.info, **SETTINGS[which])
    for batch in datamodule.all_dataloader():
        model.training_step(batch, 0)
    model.solve()
    return model.volumes.float().cpu()


def _nan_keys(ref: str, suffixes) -> dict:
    return {f"{ref}_fsc_auc_{s}{suffix}": float("nan") for s in STATS for suffix in suffixes}


def reference_scores(datamodule, masks: dict) -> dict:
    """``floor_fsc_auc_*`` and ``oracle_fsc_auc_*`` for each ``masks`` entry ({suffix: mask (D, D, D) or None};
    suffix "" is the run's primary FSC mask), and ``references``: per-state AUCs of each."""
    info = datamodule.info
    gt = info.gt_volumes
    n_states = info.n_states
    out: dict = {"references": {}}
    for ref in SETTINGS:
        P = SETTINGS[ref]["pad"] * info.box_size
        too_big = ref == "oracle" and n_states * 2 * P**3 * 12 > MAX_ORACLE_BYTES
        if not info.has_poses or too_big:
            why = "no poses" if not info.has_poses else f"{n_states} states at {P}³ exceed {MAX_ORACLE_BYTES >> 30} GiB"
            print(f"[cryobench_lab] reference '{ref}' not computed ({why}); its keys are NaN", file=sys.stderr)
            out.update(_nan_keys(ref, masks))
            continue
        vols = reference_volumes(datamodule, ref)
        per_state = {suffix: [] for suffix in masks}
        for s in range(n_states):
            vol = vols[0] if ref == "floor" else vols[s]
            for suffix, mask in masks.items():
                m = mask[s] if mask is not None and mask.ndim == 4 else mask  # per-state masks (S, D, D, D)
                per_state[suffix].append(fsc_summary(vol, gt[s], apix=info.apix, mask=m)["auc"])
        for suffix, aucs in per_state.items():
            v = np.asarray(aucs, dtype=np.float64)
            out.update({f"{ref}_fsc_auc_mean{suffix}": float(v.mean()), f"{ref}_fsc_auc_std{suffix}": float(v.std()),
                        f"{ref}_fsc_auc_median{suffix}": float(np.median(v))})
            out["references"][f"{ref}{suffix}"] = aucs
    return out
