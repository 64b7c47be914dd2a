"""Shared fixtures: a tiny labelled particle dataset written with the project's own writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


def _blob_volume(D: int, centres: list[tuple[float, float, float]], sigma: float) -> torch.Tensor:
    from cryobench_lab.physics.gaussians import voxelize_gaussians

    c = torch.tensor(centres, dtype=torch.float32)
    return voxelize_gaussians(c, torch.full((len(c),), sigma), torch.ones(len(c)), D, 1.0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Two states (different blob arrangements), D=32, 3 Å/px, 150 images each, CTF, SNR 1, shifts.

    Files: particles.mrcs, particles.star (RELION 3.1), labels.npy, gt_volumes/state_00{0,1}.mrc. Images
    follow docs/conventions.md: observed = CTF ⊛ projection shifted by −t, sign inverted, white noise.
    """
    from cryobench_lab.io.mrc import write_mrc, write_stack
    from cryobench_lab.io.star import write_particle_star
    from cryobench_lab.physics.ctf import ctf_image
    from cryobench_lab.physics.fft import fft2_center, ifft2_center
    from cryobench_lab.physics.rotations import random_rotations
    from cryobench_lab.physics.slicing import project_volume

    out = tmp_path_factory.mktemp("tiny")
    D, n_per, apix = 32, 150, 3.0
    g = torch.Generator().manual_seed(0)
    states = [
        _blob_volume(D, [(-5, 0, 0), (5, 0, 0), (0, 6, 2)], 2.0),
        _blob_volume(D, [(-5, 0, 0), (3, -4, 3), (0, 0, -6), (4, 5, 0)], 2.0),
    ]
    (out / "gt_volumes").mkdir()
    images, rots, trans, ctfs, labels = [], [], [], [], []
    for s, vol in enumerate(states):
        write_mrc(out / "gt_volumes" / f"state_{s:03d}.mrc", vol.numpy(), apix=apix)
        rot = random_rotations(n_per, generator=g)
        t = (torch.rand(n_per, 2, generator=g) - 0.5) * 4  # px
        ctf = torch.zeros(n_per, 9)
        ctf[:, 0], ctf[:, 1] = D, apix
        ctf[:, 2] = 8000 + 4000 * torch.rand(n_per, generator=g)
        ctf[:, 3] = ctf[:, 2] - 200
        ctf[:, 4] = 360 * torch.rand(n_per, generator=g)
        ctf[:, 5], ctf[:, 6], ctf[:, 7] = 300.0, 2.7, 0.1
        proj = project_volume(vol, rot, shifts=-t)  # (n, D, D)
        clean = ifft2_center(fft2_center(proj) * ctf_image(ctf, D)).real
        images.append(-clean)
        rots.append(rot), trans.append(t), ctfs.append(ctf), labels.append(torch.full((n_per,), s))
    clean = torch.cat(images)
    noisy = clean + clean.std() * torch.randn(clean.shape, generator=g)  # SNR 1
    n = len(noisy)
    write_stack(out / "particles.mrcs", noisy.numpy().astype(np.float32), apix=apix)
    write_particle_star(
        out / "particles.star", [f"{i + 1}@particles.mrcs" for i in range(n)], torch.cat(rots).numpy(),
        torch.cat(trans).numpy(), torch.cat(ctfs).numpy(), apix=apix, D=D,
    )
    np.save(out / "labels.npy", torch.cat(labels).numpy().astype(np.int64))
    return out
