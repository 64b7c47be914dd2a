"""Contrast transfer function (cryoDRGN / RELION form, domain.md §1).

With s the spatial frequency in 1/Å, ``α = atan2(ky, kx)`` and the electron wavelength
``λ = 12.2639 / sqrt(V + 0.97845e-6 V²)`` Å (V in volts):

    Δf = ½(dfU + dfV) + ½(dfU − dfV)·cos(2(α − α_ast))
    γ  = 2π(−½·Δf·λ·s² + ¼·Cs·λ³·s⁴) − φ
    CTF = √(1 − w²)·sin γ − w·cos γ           (× exp(−B/4·s²) if a B-factor is given)

Units: defocus Å, astigmatism angle α_ast and phase shift φ in degrees, Cs in mm, voltage in kV,
w the amplitude contrast, B in Å².
"""

import math

import torch

from cryobench_lab.errors import InputError
from cryobench_lab.physics.lattice import freq_grid_2d

# Columns of the cryoDRGN (N, 9) CTF layout.
CTF_COLUMNS = (
    "box_size",
    "apix",
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "cs",
    "amplitude_contrast",
    "phase_shift",
)


def electron_wavelength(voltage):
    """Relativistic electron wavelength in Å for an accelerating voltage in kV (tensor or float)."""
    volts = voltage * 1000.0
    return 12.2639 / (volts + 0.97845e-6 * volts**2) ** 0.5


def _per_image(p, like: torch.Tensor, n_spatial: int) -> torch.Tensor:
    """A ``(B,)`` parameter (or scalar) as a tensor of shape ``(B, 1, ..., 1)`` for broadcasting."""
    p = torch.as_tensor(p, dtype=like.dtype, device=like.device)
    if p.ndim == 0:
        return p
    return p.reshape(p.shape[0], *([1] * n_spatial))


def compute_ctf(
    freqs: torch.Tensor,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage,
    cs,
    amplitude_contrast,
    phase_shift=0.0,
    bfactor=None,
) -> torch.Tensor:
    """CTF at ``freqs (B or 1, *S, 2)`` = ``[kx, ky]`` in 1/Å → ``(B, *S)`` (e.g. S = (H, W)).

    Every other argument is a python float or a ``(B,)`` tensor, broadcast as ``(B, 1, ..., 1)`` against
    the spatial dims ``S``: defocus_u/v in Å, defocus_angle in degrees, voltage in kV, cs in mm,
    amplitude_contrast unitless, phase_shift in degrees, bfactor in Å² (None: no envelope).
    """
    n_spatial = freqs.ndim - 2
    dfu, dfv, ang_ast, kv, cs_mm, w, phase = (
        _per_image(p, freqs, n_spatial)
        for p in (defocus_u, defocus_v, defocus_angle, voltage, cs, amplitude_contrast, phase_shift)
    )
    lam = electron_wavelength(kv)  # Å
    cs_A = cs_mm * 1e7
    kx, ky = freqs[..., 0], freqs[..., 1]
    s2 = kx.square() + ky.square()
    alpha = torch.atan2(ky, kx)
    df = 0.5 * (dfu + dfv) + 0.5 * (dfu - dfv) * torch.cos(2.0 * (alpha - torch.deg2rad(ang_ast)))
    gamma = 2.0 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs_A * lam**3 * s2.square()) - torch.deg2rad(phase)
    ctf = torch.sqrt(1.0 - w.square()) * torch.sin(gamma) - w * torch.cos(gamma)
    if bfactor is not None:
        ctf = ctf * torch.exp(-_per_image(bfactor, freqs, n_spatial) / 4.0 * s2)
    return ctf


def ctf_from_params(freqs: torch.Tensor, params: torch.Tensor, bfactor=None) -> torch.Tensor:
    """CTF from cryoDRGN ``params (B, 9)`` = ``[D, apix, dfU, dfV, dfAng, kV, Cs, w, phase]``.

    ``freqs (B or 1, *S, 2)`` in 1/Å (columns 0 and 1 are not used here) → ``(B, *S)``.
    """
    return compute_ctf(freqs, *params[:, 2:9].unbind(-1), bfactor=bfactor)


def ctf_image(params: torch.Tensor, D: int, bfactor=None) -> torch.Tensor:
    """CTF images on the centred ``D × D`` FFT grid from cryoDRGN ``params (B, 9)`` → ``(B, D, D)``.

    The frequency grid uses each row's apix (column 1): ``k / (D · apix)``. Column 0 must equal ``D``, i.e.
    the parameters must already describe images of this box size (after downsampling D0 → D the pixel
    size is ``apix · D0 / D``; :func:`rescale_ctf_params` does that).
    """
    if not bool((params[:, 0] == D).all()):
        raise InputError(
            f"CTF params: column 0 (box size) is {params[:, 0].unique().tolist()} but the images are {D} px; "
            f"rescale them with cryobench_lab.physics.ctf.rescale_ctf_params(params, {D})"
        )
    unit = freq_grid_2d(D, 1.0, device=params.device, dtype=params.dtype)  # (D, D, 2) cycles/px
    freqs = unit / params[:, 1].reshape(-1, 1, 1, 1)  # (B, D, D, 2) 1/Å
    return ctf_from_params(freqs, params, bfactor=bfactor)


def rescale_ctf_params(params: torch.Tensor, D: int) -> torch.Tensor:
    """CTF params for images downsampled (Fourier-cropped) from their box ``D0`` (column 0) to ``D``.

    The physical box ``D0 · apix0`` is unchanged, so the new pixel size is ``apix0 · D0 / D``.
    """
    out = params.clone()
    out[:, 1] = params[:, 0] * params[:, 1] / D
    out[:, 0] = D
    return out
