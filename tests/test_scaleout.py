"""Scale-out: DDP on CPU (2 gloo processes = 1 process), per-image tables under DDP, batch sharding, the
chunked shuffler, bf16-mixed precision, and the local/SLURM launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from cryobench_lab.data.samplers import ChunkedShuffleSampler, ShardedBatches

REPO = Path(__file__).resolve().parents[1]


def _data_args(tiny) -> list[str]:
    return ["data=custom", f"data.particles={tiny / 'particles.star'}", f"data.labels={tiny / 'labels.npy'}",
            f"data.gt_volumes={tiny / 'gt_volumes'}", "logger=csv", "metrics=fast", "trainer.enable_progress_bar=false"]


def _env(tmp_path) -> dict:
    return dict(os.environ, WANDB_MODE="disabled", CRYOBENCH_LAB_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def _run_in_process(args: list[str], out: Path, monkeypatch) -> dict:
    from cryobench_lab.__main__ import _app

    monkeypatch.setattr(sys, "argv", ["cryobench_lab", *args, f"hydra.run.dir={out}"])
    _app()
    return json.loads((out / "metrics.json").read_text())


# ---- sharding and shuffling ------------------------------------------------------------------------------
def test_sharded_batches_split_every_global_batch_over_ranks():
    indices = np.arange(100, 207)  # 107 particles, batches of 10 → the last global batch has 7
    shares = []
    for rank in range(3):
        sampler = ShardedBatches(BatchSampler(SequentialSampler(range(107)), 10, False), indices,
                                 torch.Generator(), seed=0, rank=rank, world=3)
        shares.append(list(sampler))
    assert {len(s) for s in shares} == {11}  # every rank runs the same number of steps
    for step in range(11):
        union = sorted(i for rank in range(3) for i in shares[rank][step])
        assert union == list(indices[step * 10 : step * 10 + 10])  # the global batch, each image once
    tiny = ShardedBatches(BatchSampler(SequentialSampler(range(1)), 10, False), indices[:1], torch.Generator(), 0, 1, 2)
    assert list(tiny) == [[100]]  # an empty share repeats the batch's last image


def test_chunked_shuffle_visits_every_image_once_in_contiguous_runs():
    n, chunk, window = 1000, 50, 2
    g = torch.Generator().manual_seed(0)
    order = list(ChunkedShuffleSampler(n, chunk, window, g))
    assert sorted(order) == list(range(n))
    # each window of chunk*window consecutive draws comes from `window` chunks only
    for w in range(0, n, chunk * window):
        assert len({p // chunk for p in order[w : w + chunk * window]}) <= window
    assert order != sorted(order)
    g.manual_seed(0)
    assert list(ChunkedShuffleSampler(n, chunk, window, g)) == order  # reseeding replays the epoch


@pytest.mark.slow
def test_chunked_shuffle_trains_like_random(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    a = _run_in_process(["model=backproject", *_data_args(tiny_dataset)], tmp_path / "random", monkeypatch)
    b = _run_in_process(["model=backproject", *_data_args(tiny_dataset), "data.shuffle=chunked", "data.chunk_size=32",
                         "data.lazy=true"], tmp_path / "chunked", monkeypatch)
    # the oracle's sums do not depend on the order (up to float rounding)
    assert b["val/fsc_auc_mean"] == pytest.approx(a["val/fsc_auc_mean"], abs=1e-5)


# ---- DDP -------------------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_ddp_two_gloo_processes_give_the_one_process_metrics(tiny_dataset, tmp_path, monkeypatch):
    """trainer=ddp on CPU, 2 processes (gloo): each rank backprojects half of every batch, the Fourier sums
    are all-reduced before the solve, rank 0 alone scores: the metrics of one process."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    one = _run_in_process(["model=backproject", *_data_args(tiny_dataset)], tmp_path / "one", monkeypatch)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "cryobench_lab", "model=backproject", *_data_args(tiny_dataset), "trainer=ddp",
         "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={out}"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=550, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stderr + proc.stdout
    two = json.loads((out / "metrics.json").read_text())
    for key in ("val/fsc_auc_mean", "val/fsc_res_0.5", "val/fsc_res_0.143", "val/ari"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    assert len(two["val/per_state"]) == len(one["val/per_state"])


def _tables_worker(rank: int, world: int, init: str, out: str) -> None:
    """Per-image tables + a dense layer in DDP; each rank trains on its share of every global batch."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model, batches, targets = _tables_problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    _train(ddp, batches, targets, lambda b: np.array_split(b, world)[rank])
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


class _Net(torch.nn.ModuleDict):
    def forward(self, index):
        t = self["tables"](index)
        return self["head"](torch.cat([t["logits"], t["mu"].flatten(1)], 1))


def _tables_problem():
    from cryobench_lab.models.components.tables import PerImageTables

    torch.manual_seed(0)
    model = _Net({"tables": PerImageTables(64, n_classes=3, latent_dim=2, seed=0), "head": torch.nn.Linear(3 + 6, 4)})
    g = torch.Generator().manual_seed(1)
    targets = torch.randn(64, 4, generator=g)
    batches = [torch.randperm(64, generator=g)[:16] for _ in range(6)]
    return model, batches, targets


def _train(module, batches, targets, share) -> None:
    inner = module.module if hasattr(module, "module") else module
    dense = torch.optim.Adam(inner["head"].parameters(), lr=1e-2)
    sparse = torch.optim.SparseAdam([inner["tables"].logits.weight, inner["tables"].latents.weight], lr=0.05)
    for batch in batches:
        index = torch.as_tensor(share(batch.numpy()))
        loss = ((module(index) - targets[index]) ** 2).sum() / len(index)  # mean over this rank's images
        dense.zero_grad(), sparse.zero_grad()
        loss.backward()
        dense.step(), sparse.step()


@pytest.mark.timeout(300)
def test_per_image_tables_stay_synchronised_under_ddp(tmp_path):
    """DDP all-reduces the tables' sparse gradients: every rank applies the same row updates, and the tables
    equal a single process trained on the whole global batches."""
    import torch.multiprocessing as mp

    mp.spawn(_tables_worker, args=(2, f"file://{tmp_path}/pg", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    model, batches, targets = _tables_problem()
    _train(model, batches, targets, lambda b: b)
    for key, value in model.state_dict().items():
        assert torch.equal(r0[key], r1[key]), key  # the replicas are identical
        assert torch.allclose(r0[key], value, atol=1e-5), key  # and equal one process on the global batches


# ---- mixed precision -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bf16_mixed_precision_on_cpu(tiny_dataset, tmp_path, monkeypatch):
    """trainer.precision=bf16-mixed runs a method under CPU autocast. FFTs, sums and complex products stay fp32,
    but matrix products (slice coordinates R·k) drop to bf16: the oracle moves by ~1e-4 FSC-AUC. The mixture
    of fields has its own switch, model.bf16=true (autocast around the fields' MLPs only, physics in fp32):
    a small one trains to within 0.02 FSC-AUC of its fp32 run (README "Scale out")."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = [*_data_args(tiny_dataset)]
    bp32 = _run_in_process(["model=backproject", *args], tmp_path / "bp32", monkeypatch)
    bp16 = _run_in_process(["model=backproject", *args, "trainer.precision=bf16-mixed"], tmp_path / "bp16", monkeypatch)
    assert bp16["val/fsc_auc_mean"] == pytest.approx(bp32["val/fsc_auc_mean"], abs=1e-3)
    small = ["model=classify3d", "model.n_classes=2", "model.hidden_dim=32", "model.n_layers=1", "+model.n_features=16",
             "model.epochs=4", "+model.lr=2e-3", *args]
    h32 = _run_in_process([*small, "+model.bf16=false"], tmp_path / "h32", monkeypatch)
    h16 = _run_in_process([*small, "+model.bf16=true"], tmp_path / "h16", monkeypatch)
    assert np.isfinite(h16["val/fsc_auc_mean"])
    print("bf16-mixed vs 32-true FSC-AUC: oracle", bp16["val/fsc_auc_mean"], bp32["val/fsc_auc_mean"],
          "classify3d", h16["val/fsc_auc_mean"], h32["val/fsc_auc_mean"])
    assert h16["val/fsc_auc_mean"] == pytest.approx(h32["val/fsc_auc_mean"], abs=0.02)
