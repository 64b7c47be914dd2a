"""CTF against values computed by hand (scalar math), closed-form zeros, broadcasting, cryoDRGN layout."""

import math
import pickle

import numpy as np
import pytest
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.physics.ctf import (
    compute_ctf,
    ctf_from_params,
    ctf_image,
    electron_wavelength,
    rescale_ctf_params,
)
from cryobench_lab.physics.lattice import freq_grid_2d
from shared_data import SHARED


def _hand_ctf(kx, ky, dfu, dfv, ang_deg, kv, cs_mm, w, phase_deg=0.0, bfactor=None):
    """Scalar reference written out with `math` from domain.md §1."""
    volts = kv * 1000
    lam = 12.2639 / math.sqrt(volts + 0.97845e-6 * volts**2)
    s2 = kx * kx + ky * ky
    alpha = math.atan2(ky, kx)
    df = 0.5 * (dfu + dfv) + 0.5 * (dfu - dfv) * math.cos(2 * (alpha - math.radians(ang_deg)))
    gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs_mm * 1e7 * lam**3 * s2**2) - math.radians(
        phase_deg
    )
    ctf = math.sqrt(1 - w * w) * math.sin(gamma) - w * math.cos(gamma)
    if bfactor is not None:
        ctf *= math.exp(-bfactor / 4 * s2)
    return ctf


def test_wavelength_textbook_values():
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)  # Å at 300 kV
    assert electron_wavelength(200.0) == pytest.approx(0.025079, abs=2e-6)


def test_ctf_matches_hand_computed_points():
    # Astigmatic, 300 kV, three frequencies in different directions; one with phase plate and B-factor.
    cases = [
        (
            (0.10, 0.05),
            {"dfu": 15000.0, "dfv": 14000.0, "ang_deg": 30.0, "kv": 300.0, "cs_mm": 2.7, "w": 0.1},
        ),
        (
            (-0.07, 0.12),
            {"dfu": 21000.0, "dfv": 18500.0, "ang_deg": -45.0, "kv": 200.0, "cs_mm": 2.0, "w": 0.07},
        ),
        (
            (0.20, -0.15),
            {
                "dfu": 9000.0,
                "dfv": 8000.0,
                "ang_deg": 80.0,
                "kv": 300.0,
                "cs_mm": 2.7,
                "w": 0.1,
                "phase_deg": 90.0,
                "bfactor": 50.0,
            },
        ),
    ]
    for (kx, ky), p in cases:
        expected = _hand_ctf(kx, ky, **p)
        freqs = torch.tensor([[[[kx, ky]]]], dtype=torch.float64)  # (1, 1, 1, 2)
        got = compute_ctf(
            freqs,
            p["dfu"],
            p["dfv"],
            p["ang_deg"],
            p["kv"],
            p["cs_mm"],
            p["w"],
            phase_shift=p.get("phase_deg", 0.0),
            bfactor=p.get("bfactor"),
        )
        assert got.shape == (1, 1, 1)
        assert got.item() == pytest.approx(expected, abs=1e-10)


def test_ctf_closed_forms_dc_and_first_zero_along_each_axis():
    # s = 0: γ = −φ, so CTF = −w without phase plate and −√(1−w²) with a 90° phase plate.
    zero = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    assert compute_ctf(zero, 1e4, 1e4, 0.0, 300.0, 2.7, 0.1).item() == pytest.approx(-0.1)
    assert compute_ctf(zero, 1e4, 1e4, 0.0, 300.0, 2.7, 0.1, 90.0).item() == pytest.approx(-math.sqrt(0.99))
    # Cs = 0, w = 0: CTF = −sin(π Δf λ s²), first zero at s = 1/√(Δf λ). Along the astigmatism angle
    # Δf = dfU; perpendicular to it Δf = dfV — pins the angle convention (degrees, from +kx towards +ky).
    dfu, dfv, ang = 20000.0, 12000.0, 30.0
    lam = electron_wavelength(300.0)
    a = math.radians(ang)
    s_u, s_v = 1 / math.sqrt(dfu * lam), 1 / math.sqrt(dfv * lam)
    u_dir = (math.cos(a), math.sin(a))
    v_dir = (-math.sin(a), math.cos(a))
    freqs = torch.tensor(
        [
            [
                [
                    [s_u * u_dir[0], s_u * u_dir[1]],
                    [s_v * v_dir[0], s_v * v_dir[1]],
                    [s_u * v_dir[0], s_u * v_dir[1]],
                ]
            ]
        ],
        dtype=torch.float64,
    )
    c = compute_ctf(freqs, dfu, dfv, ang, 300.0, 0.0, 0.0)[0, 0]
    assert abs(c[0].item()) < 1e-9 and abs(c[1].item()) < 1e-9
    assert abs(c[2].item()) > 0.5  # the U-zero radius is not a zero along V
    # Negative defocus convention: underfocus (positive df) gives CTF < 0 at low frequency.
    low = torch.tensor([[[[0.2 * s_u * u_dir[0], 0.2 * s_u * u_dir[1]]]]], dtype=torch.float64)
    assert compute_ctf(low, dfu, dfv, ang, 300.0, 0.0, 0.0).item() < 0


def test_per_image_parameters_broadcast_to_b_h_w():
    D, B = 16, 3
    freqs = freq_grid_2d(D, apix=1.5, dtype=torch.float64)[None]  # (1, D, D, 2)
    dfu = torch.tensor([10000.0, 15000.0, 20000.0], dtype=torch.float64)
    out = compute_ctf(freqs, dfu, dfu - 500, torch.tensor([0.0, 10.0, 20.0]), 300.0, 2.7, 0.1)
    assert out.shape == (B, D, D)
    for b in range(B):
        single = compute_ctf(freqs, dfu[b].item(), dfu[b].item() - 500, 10.0 * b, 300.0, 2.7, 0.1)
        torch.testing.assert_close(out[b], single[0])


def test_ctf_image_uses_cryodrgn_layout_and_checks_box_size():
    D = 12
    params = torch.tensor(
        [
            [D, 2.0, 15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0],
            [D, 1.5, 9000.0, 9500.0, 0.0, 200.0, 2.0, 0.07, 45.0],
        ],
        dtype=torch.float64,
    )
    img = ctf_image(params, D)
    assert img.shape == (2, D, D)
    for b in range(2):
        freqs = freq_grid_2d(D, apix=params[b, 1].item(), dtype=torch.float64)[None]
        torch.testing.assert_close(img[b], compute_ctf(freqs, *params[b, 2:].tolist())[0])
        torch.testing.assert_close(img[b : b + 1], ctf_from_params(freqs, params[b : b + 1]))
    # a pixel checked by hand: index (y=D//2+1, x=D//2+3) → k = (3, 1) / (D·apix)
    kx, ky = 3 / (D * 2.0), 1 / (D * 2.0)
    assert img[0, D // 2 + 1, D // 2 + 3].item() == pytest.approx(
        _hand_ctf(kx, ky, 15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1), abs=1e-12
    )
    with pytest.raises(InputError, match="rescale_ctf_params"):
        ctf_image(params, D // 2)
    small = rescale_ctf_params(params, D // 2)
    assert small[:, 1].tolist() == [4.0, 3.0] and small[:, 0].tolist() == [D // 2] * 2
    # Downsampling keeps physical frequencies: the central D/2 block of the big CTF is the small CTF.
    lo = D // 2 - D // 4
    torch.testing.assert_close(ctf_image(small, D // 2), img[:, lo : lo + D // 2, lo : lo + D // 2])


@pytest.mark.skipif(not SHARED.exists(), reason="shared test data not available")
def test_real_cryodrgn_ctf_pickle_is_accepted():
    path = SHARED / "cryoem" / "real_particles" / "metadata_only" / "ctf1.pkl"
    with open(path, "rb") as f:
        params = torch.from_numpy(np.asarray(pickle.load(f), dtype=np.float64))  # trusted (N, 9) array
    assert (
        params.shape == (5, 9) and params[0, 0].item() == 300 and params[0, 1].item() == pytest.approx(1.035)
    )
    small = rescale_ctf_params(params, 100)
    img = ctf_image(small, 100)
    assert img.shape == (5, 100, 100) and torch.isfinite(img).all()
    assert img[:, 50, 50].tolist() == pytest.approx((-params[:, 7]).tolist())  # DC = −w (no phase plate)
    assert float(img.abs().max()) <= 1.0 + 1e-12
