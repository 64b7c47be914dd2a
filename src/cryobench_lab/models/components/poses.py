"""Pose sources for reconstruction models: where each image's rotation and shift come from.

A pose source is a module ``forward(batch) -> (rot, trans)`` with ``rot (B, 3, 3)`` or per class
``(B, K, 3, 3)`` and ``trans (B, 2)`` px (the re-centring shift, docs/conventions.md). Models only call this
interface, so a pose search or refined pose tables can replace :class:`KnownPoses`.
"""

from __future__ import annotations

import torch
from torch import nn


class KnownPoses(nn.Module):
    """The poses the data carries (consensus refinement or simulation)."""

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["rot"], batch["trans"]
