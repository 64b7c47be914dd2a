"""Pins metrics/fsc.py to an independent plain-numpy reading of domain.md §3 (FSC, AUC, 0.5/0.143 cut-offs).

The reference below is written from the text only:
"F = fftshift(fftn(fftshift(v))); integer radius r on grid coordinates −D/2…D/2−1; shell i = {i−1 ≤ r < i}
for i = 1…D/2−1, fsc[0] = 1; fsc[i] = Re Σ F1·conj(F2) / √(Σ|F1|²·Σ|F2|²); pixres[i] = i/D. FSC-AUC:
trapezoid area under (pixres, fsc). Resolution: CryoBench takes the first shell below the threshold and
reports D/k px (× apix for Å)."
"""

import numpy as np
import pytest

from cryobench_lab.metrics.fsc import fsc, fsc_auc, fsc_resolution, fsc_summary


def reference_fsc(v1, v2, mask=None):
    if mask is not None:
        v1, v2 = v1 * mask, v2 * mask
    D = v1.shape[0]
    F1 = np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v1)))
    F2 = np.fft.fftshift(np.fft.fftn(np.fft.fftshift(v2)))
    coords = np.indices((D, D, D)) - D // 2  # −D/2 … D/2−1 on each axis (D even)
    r = np.sqrt((coords**2).sum(0))
    pixres = [0.0]
    curve = [1.0]
    for i in range(1, D // 2):
        shell = (r >= i - 1) & (r < i)
        num = np.sum(F1[shell] * np.conj(F2[shell])).real
        den = np.sqrt(np.sum(np.abs(F1[shell]) ** 2) * np.sum(np.abs(F2[shell]) ** 2))
        curve.append(num / den)
        pixres.append(i / D)
    return np.array(pixres), np.array(curve)


def reference_auc(pixres, curve):
    return sum((pixres[i + 1] - pixres[i]) * (curve[i] + curve[i + 1]) / 2 for i in range(len(curve) - 1))


def reference_resolution(curve, threshold, D, apix):
    for k in range(len(curve)):
        if curve[k] < threshold:
            return D / k * apix
    return None


def _pair(D, noise, seed):
    """A smooth random volume and a noisy copy: FSC falls from 1 and crosses 0.5 and 0.143."""
    rng = np.random.default_rng(seed)
    F = np.fft.fftn(rng.standard_normal((D, D, D)))
    k = np.sqrt(sum(g**2 for g in np.meshgrid(*[np.fft.fftfreq(D)] * 3, indexing="ij")))
    v = np.fft.ifftn(F * np.exp(-((k / 0.08) ** 2))).real
    return v, v + noise * v.std() * rng.standard_normal((D, D, D))


@pytest.mark.parametrize("D,noise,seed", [(32, 0.3, 0), (48, 1.0, 1), (64, 0.1, 2)])
def test_fsc_auc_and_cutoffs_match_the_reference(D, noise, seed):
    v1, v2 = _pair(D, noise, seed)
    apix = 2.5
    freq, curve = fsc(v1, v2)
    ref_freq, ref_curve = reference_fsc(v1, v2)
    np.testing.assert_allclose(freq, ref_freq, atol=1e-15)
    np.testing.assert_allclose(curve, ref_curve, atol=1e-10)
    assert fsc_auc(freq, curve) == pytest.approx(reference_auc(ref_freq, ref_curve), abs=1e-12)
    for t in (0.5, 0.143):
        expected = reference_resolution(ref_curve, t, D, apix)
        assert expected is not None  # the pair was built to cross both thresholds
        assert fsc_resolution(freq, curve, t, apix) == pytest.approx(expected)
    s = fsc_summary(v1, v2, apix)
    assert s["auc"] == pytest.approx(reference_auc(ref_freq, ref_curve))
    assert s["res_0.5"] == pytest.approx(reference_resolution(ref_curve, 0.5, D, apix))


def test_masked_fsc_matches_the_reference():
    from cryobench_lab.metrics.masks import soft_sphere_mask

    v1, v2 = _pair(40, 0.5, 3)
    m = soft_sphere_mask(40, 12, 4).numpy()
    _, curve = fsc(v1, v2, mask=m)
    _, ref = reference_fsc(v1, v2, mask=m)
    np.testing.assert_allclose(curve, ref, atol=1e-10)
