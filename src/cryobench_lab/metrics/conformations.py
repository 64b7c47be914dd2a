"""CryoBench's per-conformation protocol: which (latent, class) represents each ground-truth state.

For each state: take its images' latents (in their assigned class), their mean, and the image latent
nearest to that mean; that image's latent and class are decoded and compared with the state's volume.
Methods without latents use the class most of the state's images are assigned to.
"""

from __future__ import annotations

from typing import Optional

import torch


def representatives(
    labels: torch.Tensor, latent: Optional[torch.Tensor], class_probs: Optional[torch.Tensor]
) -> list[dict]:
    """One ``{"state", "latent" (d,) | None, "class" int, "image" int}`` per state present in ``labels``.

    labels (N,) int64 ground-truth states (−1 = unknown, ignored); latent (N, d) or (N, K, d) per-class
    latents; class_probs (N, K).
    """
    classes = class_probs.argmax(1) if class_probs is not None else torch.zeros_like(labels)
    out = []
    for s in labels[labels >= 0].unique().tolist():
        members = torch.nonzero(labels == s).squeeze(1)
        if latent is None:
            cls = int(torch.mode(classes[members]).values)
            out.append({"state": s, "latent": None, "class": cls, "image": int(members[0])})
            continue
        z = latent[members]
        if z.dim() == 3:  # per-class latents: take each image's latent in its assigned class
            z = z[torch.arange(len(members)), classes[members]]
        nearest = int(torch.argmin(((z - z.mean(0)) ** 2).sum(1)))
        out.append({"state": s, "latent": z[nearest], "class": int(classes[members[nearest]]), "image": int(members[nearest])})
    return out
