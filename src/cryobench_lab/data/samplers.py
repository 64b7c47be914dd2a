"""Training order for large lazy stacks (chunked shuffling) and batch sharding under DDP.

``data.shuffle=random`` draws a uniform permutation each epoch: in lazy mode every batch then reads
``batch_size`` images scattered over the whole file, which on a stack larger than the page cache is one disk
seek per image. ``data.shuffle=chunked`` (:class:`ChunkedShuffleSampler`) permutes *chunks* of
``data.chunk_size`` contiguous particles and then the images inside each window of ``data.shuffle_window``
chunks, so a window of ``chunk_size × shuffle_window`` images is read in a few long sequential runs (the
dataset sorts each batch's indices) and the images of a batch still come from ``shuffle_window`` places in
the stack. Every image is seen once per epoch in both modes.

Under DDP (``trainer=ddp``) every rank builds the same global batches (same seed, same epoch) and takes its
share of each one (:class:`ShardedBatches`): rank r gets ``np.array_split(batch, world)[r]``. The gradient
that DDP averages over ranks is then the gradient of the global batch's mean loss, as with one process, and
every rank runs the same number of steps. A share that would be empty (a final batch with fewer images
than ranks) repeats the batch's last image. Per-image tables (``nn.Embedding(sparse=True)``) are replicated
on every rank and stay identical: DDP all-reduces their sparse gradients, so each rank applies the same
row updates (only the rows of the global batch move). Evaluation embeds every particle on rank 0 alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

SHUFFLES = ("random", "chunked")


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ChunkedShuffleSampler(Sampler[int]):
    """Positions 0..n−1: chunks of ``chunk_size`` in random order, positions shuffled within windows of
    ``window`` chunks. ``generator`` drives both permutations (reseed it to replay an epoch)."""

    def __init__(self, n: int, chunk_size: int, window: int, generator: torch.Generator):
        if chunk_size < 1 or window < 1:
            raise ValueError(f"data.chunk_size and data.shuffle_window must be >= 1 (got {chunk_size}, {window})")
        self.n, self.chunk_size, self.window, self.generator = n, chunk_size, window, generator

    def __iter__(self):
        n_chunks = math.ceil(self.n / self.chunk_size)
        order = torch.randperm(n_chunks, generator=self.generator)
        for w in range(0, n_chunks, self.window):
            pos = torch.cat([torch.arange(c * self.chunk_size, min((c + 1) * self.chunk_size, self.n))
                             for c in order[w : w + self.window].tolist()])
            yield from pos[torch.randperm(len(pos), generator=self.generator)].tolist()

    def __len__(self) -> int:
        return self.n


class ShardedBatches:
    """Global batches of dataset indices (from positions into ``indices``), this rank's share of each.

    ``set_epoch`` reseeds the shuffle with ``seed`` and the epoch, so every rank (and a resumed run) draws
    the same global batches in an epoch.
    """

    def __init__(self, batch_sampler: BatchSampler, indices: np.ndarray, generator: torch.Generator, seed: int,
                 rank: int = 0, world: int = 1):
        self.batch_sampler, self.indices, self.generator, self.seed = batch_sampler, indices, generator, seed
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)

    def __iter__(self):
        for positions in self.batch_sampler:
            batch = self.indices[positions]
            share = np.array_split(batch, self.world)[self.rank] if self.world > 1 else batch
            yield (share if len(share) else batch[-1:]).tolist()

    def __len__(self) -> int:
        return len(self.batch_sampler)


def training_loader(datamodule, indices: np.ndarray) -> DataLoader:
    """The training DataLoader of a :class:`~cryobench_lab.data.particles.ParticleDataModule`: shuffled by
    ``data.shuffle``, sharded over DDP ranks; see the module docstring."""
    cfg = datamodule.cfg
    shuffle = getattr(cfg, "shuffle", "random")
    if shuffle not in SHUFFLES:
        from cryobench_lab.errors import InputError

        raise InputError(f"data.shuffle={shuffle!r} is unknown; use random or chunked")
    rank, world = distributed_rank_world()
    if shuffle == "random" and world == 1:
        return datamodule._loader(indices, shuffle=True)
    generator = torch.Generator().manual_seed(datamodule.seed)
    if shuffle == "chunked":
        sampler = ChunkedShuffleSampler(len(indices), cfg.chunk_size, cfg.shuffle_window, generator)
    else:
        sampler = RandomSampler(range(len(indices)), generator=generator)
    batches = ShardedBatches(BatchSampler(sampler, cfg.batch_size, drop_last=False), np.asarray(indices), generator,
                             datamodule.seed, rank, world)
    return DataLoader(datamodule.dataset, sampler=batches, batch_size=None, num_workers=cfg.num_workers,
                      persistent_workers=cfg.num_workers > 0)
