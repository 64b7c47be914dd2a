"""ParticleDataModule: batch contract, lazy == in-memory, Fourier cropping, splits, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cryobench_lab.config import DataConfig
from cryobench_lab.data.particles import ParticleDataModule, fourier_crop_2d
from cryobench_lab.errors import InputError


def _cfg(tiny, **kw):
    base = OmegaConf.structured(DataConfig(name="tiny"))
    base.particles = str(tiny / "particles.star")
    base.labels = str(tiny / "labels.npy")
    base.gt_volumes = str(tiny / "gt_volumes")
    base.batch_size = 32
    return OmegaConf.merge(base, kw)


def _dm(tiny, **kw):
    dm = ParticleDataModule(_cfg(tiny, **kw))
    dm.setup()
    return dm


def test_batch_contract(tiny_dataset):
    dm = _dm(tiny_dataset)
    batch = next(iter(dm.train_dataloader()))
    B = batch["images"].shape[0]
    assert batch["images"].shape == (B, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["rot"].shape == (B, 3, 3) and batch["trans"].shape == (B, 2)
    assert batch["ctf"].shape == (B, 9) and batch["index"].dtype == torch.int64
    assert set(batch["label"].tolist()) <= {0, 1}
    assert dm.info.n_states == 2 and dm.info.gt_volumes.shape == (2, 32, 32, 32)
    # normalised to unit scale over the dataset
    all_images = dm.dataset[list(range(len(dm.dataset)))]["images"]
    assert all_images.std().item() == pytest.approx(1.0, rel=0.05)


def test_lazy_equals_in_memory(tiny_dataset):
    lazy = _dm(tiny_dataset, lazy=True)
    mem = _dm(tiny_dataset, lazy=False)
    assert lazy.dataset.images is None and mem.dataset.images is not None
    idx = [7, 3, 250, 4, 5, 6, 0]  # unsorted, with a contiguous run
    a, b = lazy.dataset[idx], mem.dataset[idx]
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_memory_cap_selects_lazy(tiny_dataset):
    assert _dm(tiny_dataset, memory_cap_gb=1e-6).dataset.images is None
    assert _dm(tiny_dataset, memory_cap_gb=1.0).dataset.images is not None


def test_fourier_crop_keeps_scale_and_metadata(tiny_dataset):
    full, half = _dm(tiny_dataset), _dm(tiny_dataset, box_size=16)
    b_full, b_half = full.dataset[[0, 1]], half.dataset[[0, 1]]
    assert b_half["images"].shape == (2, 16, 16)
    torch.testing.assert_close(b_half["trans"], b_full["trans"] / 2)
    torch.testing.assert_close(b_half["ctf"][:, 1], b_full["ctf"][:, 1] * 2)
    assert (b_half["ctf"][:, 0] == 16).all()
    assert half.info.apix == pytest.approx(2 * full.info.apix)
    const = torch.full((1, 32, 32), 3.0)
    torch.testing.assert_close(fourier_crop_2d(const, 16), torch.full((1, 16, 16), 3.0))


def test_split_is_deterministic_and_disjoint(tiny_dataset):
    a, b = _dm(tiny_dataset), _dm(tiny_dataset)
    np.testing.assert_array_equal(a.val_indices, b.val_indices)
    assert not set(a.val_indices) & set(a.train_indices)
    assert len(a.val_indices) + len(a.train_indices) == 300
    order_a = torch.cat([x["index"] for x in a.train_dataloader()])
    order_b = torch.cat([x["index"] for x in b.train_dataloader()])
    torch.testing.assert_close(order_a, order_b)


def test_nan_images_are_reported(tiny_dataset, tmp_path):
    from cryobench_lab.io.mrc import read_mrc, write_stack

    stack, apix = read_mrc(tiny_dataset / "particles.mrcs")
    stack = stack.copy()
    stack[5, 3, 3] = np.nan
    stack[17, 0, 0] = np.inf
    write_stack(tmp_path / "particles.mrcs", stack, apix)
    (tmp_path / "particles.star").write_text((tiny_dataset / "particles.star").read_text())
    with pytest.raises(InputError, match=r"5, 17"):
        _dm(tiny_dataset, particles=str(tmp_path / "particles.star"))


def test_label_count_mismatch(tiny_dataset, tmp_path):
    np.save(tmp_path / "labels.npy", np.zeros(299, dtype=np.int64))
    with pytest.raises(InputError, match="labels.npy"):
        _dm(tiny_dataset, labels=str(tmp_path / "labels.npy"))


def test_structure_may_name_a_bundled_model(tiny_dataset, tmp_path):
    from cryobench_lab.data.presets import STRUCTURES_DIR

    assert _dm(tiny_dataset, structure="adk/pdb1ake.pdb.gz").info.structure == str(STRUCTURES_DIR / "adk" / "pdb1ake.pdb.gz")
    own = tmp_path / "mine.pdb.gz"  # a user's file is taken as it is
    own.write_bytes((STRUCTURES_DIR / "adk" / "pdb1ake.pdb.gz").read_bytes())
    assert _dm(tiny_dataset, structure=str(own)).info.structure == str(own)
    # a name that is neither stays as given, for the model's one-line "file not found"
    assert _dm(tiny_dataset, structure="adk/nothing.pdb").info.structure == "adk/nothing.pdb"
