"""FSC exactly as CryoBench defines it: a loop reference, closed forms, low-pass cut-offs, conventions."""

import json

import numpy as np
import pytest
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.metrics.fsc import fsc, fsc_auc, fsc_resolution, fsc_summary


def _loop_reference(v1, v2):
    """Shell-by-shell loop written from domain.md §3 (independent of the vectorised code)."""
    D = v1.shape[0]
    F1 = np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v1)))
    F2 = np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v2)))
    x = np.arange(-D // 2, D // 2)
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    r = np.sqrt(xx**2 + y**2 + z**2)
    curve = [1.0]
    for i in range(1, D // 2):
        sel = (r >= i - 1) & (r < i)
        a, b = F1[sel], F2[sel]
        curve.append(
            float(np.real(np.sum(a * np.conj(b))) / np.sqrt(np.sum(np.abs(a) ** 2) * np.sum(np.abs(b) ** 2)))
        )
    return np.arange(D // 2) / D, np.array(curve)


def _smooth_volume(D, seed):
    rng = np.random.default_rng(seed)
    x = np.arange(D) - D // 2
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    vol = np.zeros((D, D, D))
    for _ in range(12):
        c = rng.uniform(-D / 5, D / 5, 3)
        vol += rng.uniform(0.5, 1.5) * np.exp(
            -((xx - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 2.0**2)
        )
    return vol + 0.05 * rng.standard_normal((D, D, D))  # broadband, so every shell has signal


def test_matches_the_shell_loop_reference_and_accepts_torch():
    v1, v2 = _smooth_volume(32, 0), _smooth_volume(32, 1)
    v2 = 0.7 * v1 + v2
    freq, curve = fsc(v1, v2)
    ref_freq, ref_curve = _loop_reference(v1, v2)
    np.testing.assert_allclose(freq, ref_freq)
    np.testing.assert_allclose(curve, ref_curve, atol=1e-12)
    assert freq.shape == (16,) and freq[1] == 1 / 32 and curve[0] == 1.0
    # shell 1 is the zero frequency alone: its FSC is the sign of the product of the two volume sums
    assert curve[1] == pytest.approx(np.sign(v1.sum() * v2.sum()))
    _, curve_t = fsc(torch.from_numpy(v1).float(), torch.from_numpy(v2).float())
    np.testing.assert_allclose(curve_t, curve, atol=1e-5)


def test_identical_volumes_give_one_and_the_closed_form_auc():
    v = _smooth_volume(128, 2)
    freq, curve = fsc(v, v)
    np.testing.assert_allclose(curve, 1.0, atol=1e-12)
    auc = fsc_auc(freq, curve)
    assert auc == pytest.approx((128 / 2 - 1) / 128, abs=1e-12)  # 0.4921875: "≈ 0.49 at D = 128"
    assert fsc_resolution(freq, curve, 0.5, apix=3.0) == 6.0  # never below → Nyquist (2 px)
    assert fsc_resolution(freq, curve, 0.5, apix=3.0, convention="cryodrgn") == pytest.approx(3.0 * 128 / 63)


def test_independent_noise_is_uncorrelated():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((64, 64, 64)), rng.standard_normal((64, 64, 64))
    _, curve = fsc(a, b)
    # shell i holds ~4π(i−½)² voxels, so |FSC| ~ 1/√n: below 0.15 from shell 4 on
    assert np.abs(curve[4:]).max() < 0.15
    assert np.abs(curve[10:]).mean() < 0.03


@pytest.mark.parametrize("k", [6, 13, 20])
def test_sharp_low_pass_cuts_the_curve_at_its_shell(k):
    D = 64
    v = _smooth_volume(D, 4)
    F = np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v)))
    x = np.arange(-D // 2, D // 2)
    z, y, xx = np.meshgrid(x, x, x, indexing="ij")
    r = np.sqrt(xx**2 + y**2 + z**2)
    low = np.real(np.fft.ifftshift(np.fft.ifftn(np.fft.ifftshift(F * (r < k)))))  # keeps shells 1..k
    # Above the cut the low-passed spectrum is pure FFT round-off, which is correlated with the signal
    # and makes those shells arbitrary; a faint independent noise floor makes "≈ 0" well defined.
    low += 1e-3 * np.random.default_rng(k).standard_normal(low.shape)
    freq, curve = fsc(v, low)
    assert curve[1 : k + 1].min() > 0.99
    assert np.abs(curve[k + 1 :]).max() < 0.25 and np.abs(curve[k + 1 :]).mean() < 0.06
    res = fsc_resolution(freq, curve, 0.5)
    assert D / (k + 1) <= res <= D / (k - 1)  # CryoBench convention: first shell below, k + 1
    assert res == pytest.approx(D / (k + 1))
    assert fsc_resolution(freq, curve, 0.5, convention="cryodrgn") == pytest.approx(D / k)
    # the AUC counts k shells of 1 plus the ramp down to the next sample
    assert fsc_auc(freq, curve) == pytest.approx((k + 0.5) / D, abs=0.05 / D * (D / 2))


def test_resolution_conventions_on_a_curve_that_dips_and_recovers():
    D, apix = 16, 2.0
    freq = np.arange(D // 2) / D
    curve = np.array([1.0, 0.9, 0.6, 0.4, 0.6, 0.3, 0.1, 0.05])
    assert fsc_resolution(freq, curve, 0.5, apix) == pytest.approx(D / 3 * apix)  # first below: shell 3
    assert fsc_resolution(freq, curve, 0.5, apix, convention="cryodrgn") == pytest.approx(D / 4 * apix)
    assert fsc_resolution(freq, curve, 0.143, apix) == pytest.approx(D / 6 * apix)
    assert fsc_resolution(freq, curve, 0.143, apix, convention="cryodrgn") == pytest.approx(D / 5 * apix)
    assert fsc_resolution(freq, np.array([1.0, 0.1, 0.0, 0, 0, 0, 0, 0]), 0.5, convention="cryodrgn") is None
    with pytest.raises(InputError, match="convention"):
        fsc_resolution(freq, curve, 0.5, convention="relion")


def test_mask_is_applied_to_both_volumes_and_empty_shells_are_handled():
    v1, v2 = _smooth_volume(32, 5), _smooth_volume(32, 6)
    mask = np.zeros((32, 32, 32))
    mask[4:28, 4:28, 4:28] = 1.0
    np.testing.assert_allclose(fsc(v1, v2, mask)[1], fsc(v1 * mask, v2 * mask)[1])
    # A volume that is zero everywhere must not score as perfect (CryoBench's code would give 1.0).
    _, curve = fsc(v1, np.zeros_like(v1))
    assert curve[0] == 1.0 and (curve[1:] == 0.0).all()
    _, curve = fsc(np.zeros_like(v1), np.zeros_like(v1))
    assert (curve == 1.0).all()
    with pytest.raises(InputError, match="mask"):
        fsc(v1, v2, mask[:16])
    with pytest.raises(InputError, match="cubic"):
        fsc(v1, v2[:16])


def test_summary_is_json_friendly():
    v1, v2 = _smooth_volume(32, 7), _smooth_volume(32, 8)
    out = fsc_summary(v1, 0.5 * v1 + v2, apix=3.0)
    assert set(out) == {"curve", "freq", "auc", "res_0.5", "res_0.143"}
    json.dumps(out)
    assert len(out["curve"]) == 16 and out["res_0.143"] <= out["res_0.5"]
    freq, curve = fsc(v1, 0.5 * v1 + v2)
    assert out["auc"] == fsc_auc(freq, curve) and out["res_0.5"] == fsc_resolution(freq, curve, 0.5, 3.0)
