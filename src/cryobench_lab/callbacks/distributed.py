"""DDP support for methods that accumulate sums instead of following gradients.

Strategy ``ddp_cryobench`` (conf/trainer/ddp.yaml): Lightning's DDP (one process per device, started by
re-running the command, or by SLURM on a cluster) with ``find_unused_parameters=True`` (a mixture method in
hard assignment leaves the fields of absent classes out of a step) that does not wrap a method without
trainable parameters in ``DistributedDataParallel`` (which refuses such a module): such a method has no
gradients to synchronise, only sums.

A method lists its accumulator buffers in ``rank_summed_buffers`` (e.g. the backprojection's Fourier sums
``num`` and ``den``). Under DDP each rank accumulates over its share of every batch; at the end of each
training epoch, before the method's own ``on_train_epoch_end`` (Lightning calls callbacks first), this
callback all-reduces them, so every rank solves with the sums over the whole data. Ranks > 0 then restart
from zero at the next epoch, so a later all-reduce adds only the new contributions to rank 0's totals.

Per-image tables that a method overwrites row by row (an EM's per-image noise σ_i²) are listed in
``rank_merged_rows``: each rank writes the rows of its own images, so at the epoch's end every row a rank
changed during the epoch is sent to all ranks (ranks own disjoint images; a row nobody changed keeps its value).

Every name is an attribute of the module holding a tensor. Without a process group the callback does
nothing.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry


class GradientFreeAwareDDP(DDPStrategy):
    """DDP that leaves a module with no trainable parameter unwrapped (see the module docstring)."""

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


if "ddp_cryobench" not in StrategyRegistry:
    StrategyRegistry.register("ddp_cryobench", GradientFreeAwareDDP, description="DDP for every cryobench_lab method",
                              start_method="popen", find_unused_parameters=True)


class SumBuffersAcrossRanks(L.Callback):
    def __init__(self):
        self._snapshots: dict[str, torch.Tensor] = {}  # per-image tables at the epoch's start

    def _buffers(self, pl_module) -> list[torch.Tensor]:
        return [getattr(pl_module, name) for name in getattr(pl_module, "rank_summed_buffers", ())]

    @staticmethod
    def _distributed() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._distributed():
            return
        if trainer.current_epoch > 0 and not trainer.is_global_zero:
            for buf in self._buffers(pl_module):
                buf.zero_()
        self._snapshots = {name: getattr(pl_module, name).clone() for name in getattr(pl_module, "rank_merged_rows", ())}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._distributed():
            return
        for buf in self._buffers(pl_module):
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        for name, before in self._snapshots.items():
            merge_changed_rows(getattr(pl_module, name), before)


def merge_changed_rows(table: torch.Tensor, before: torch.Tensor) -> None:
    """In place: every row of ``table (N, ...)`` that some rank changed since ``before`` takes that rank's value.

    Rows are owned by one rank each (disjoint shares of the images); NaN → NaN is no change."""
    changed = (table != before) & ~(table.isnan() & before.isnan())
    changed = changed.reshape(len(table), -1).any(1)  # (N,)
    values = torch.where(changed.reshape(-1, *[1] * (table.dim() - 1)), table, torch.zeros_like(table))
    count = changed.to(table.dtype)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    merged = values / count.clamp(min=1).reshape(-1, *[1] * (table.dim() - 1))
    table.copy_(torch.where((count > 0).reshape(-1, *[1] * (table.dim() - 1)), merged, before))
