"""Training renderer for Gaussian mixtures whose amplitudes change per image (gated mixtures).

Same image as :func:`cryobench_lab.physics.gaussians.project_gaussians` (pixel-integrated projection,
``(B, D, D)`` indexed ``[y, x]``, amplitude·Å) but with

- per-image amplitudes ``(B, N)`` and per-Gaussian σ ``(N,)`` (``components.atoms.project_residues``
  takes one σ and per-Gaussian amplitudes only);
- ONE ``erf`` per pixel edge (project_gaussians keeps the far-tail digits with six erf/erfc branches,
  which a training loss does not need);
- a window per Gaussian: pixel factors are evaluated only within ±5σ of the centre (tails below 6e-7 of
  the peak are dropped) and scattered into the dense ``(b, N, D)`` factors of the batched matmul;
  elementwise passes over the ``(2, B, N, D + 1)`` edge tensor, not the matmul, dominate at D = 64
  (profiled), and the window cuts them by ``D / W``; images are rendered a few at a time so that each
  chunk's dense factors stay in cache;
- a hand-written backward: autograd through ``erf``, the edge differences and the slices walks the edge
  tensor about twenty times; here the backward recomputes ``exp(−u²)`` once on the window.

Derivatives, for one axis with ``u_e = (e − x) / (√2 σ)`` at the pixel edges ``e`` and the pixel mean
``m = σ√(π/2)/apix · (erf(u_hi) − erf(u_lo))``: ``∂m/∂x = (exp(−u_lo²) − exp(−u_hi²)) / apix`` and
``∂m/∂σ = m/σ − √2/apix · (u_hi exp(−u_hi²) − u_lo exp(−u_lo²))``.
"""

from __future__ import annotations

import math

import torch

# Elements per (2, b, N, D) chunk of dense factors: 8 MB of float32, so that the zeroing, the scatter and the
# matmul of a chunk run in cache (at 8,192 Gaussians, B = 64, D = 64 on this machine: 2.7× faster than 64 MB).
_FACTOR_ELEMENTS = 1 << 21
# Half-width of each Gaussian's pixel window in σ: the tail beyond 5σ is erfc(5/√2) ≈ 6e-7 of the peak.
_WINDOW_SIGMAS = 5.0


def window_pixels(sigma_max: float, D: int, apix: float) -> int:
    """Pixels in each Gaussian's window: ±5σ of the widest Gaussian (σ in Å), at most the box ``D``."""
    return min(D, 2 * math.ceil(_WINDOW_SIGMAS * sigma_max / apix) + 2)


def window_start(x: torch.Tensor, W: int, D: int, apix: float) -> torch.Tensor:
    """First pixel (int64, same shape as ``x``) of the ``W``-pixel window around each coordinate ``x`` (Å,
    along one image axis). A window is moved inside the box where it would leave it: its pixels are then
    still exact, only tail pixels beyond the window are dropped."""
    return (torch.floor(x / apix + D // 2 + 0.5) - W // 2).clamp_(0, D - W).long()


def window_offsets(xy: torch.Tensor, sigma: torch.Tensor | float, j0: torch.Tensor, W: int, D: int, apix: float) -> torch.Tensor:
    """``u = (e − x) / (√2 σ)`` on the ``W + 1`` edges of each Gaussian's window → ``(..., N, W + 1)``, for
    centres ``xy (..., N)`` Å along one axis, σ ``(N,)`` Å or one σ for all, and first pixels ``j0`` shaped
    like ``xy``."""
    inv = 1.0 / (math.sqrt(2.0) * sigma)
    if torch.is_tensor(inv):
        inv = inv[:, None]  # (N, 1)
    first = (j0.to(xy.dtype) - (D // 2 + 0.5)).mul_(apix).sub_(xy)[..., None]  # (..., N, 1) Å
    return (first + torch.arange(W + 1, device=xy.device, dtype=xy.dtype) * apix).mul_(inv)


def _dense_factors(out: torch.Tensor, j0: torch.Tensor, means: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Window pixel means ``(2, b, N, W)`` starting at pixels ``j0 (2, b, N)`` → the dense factors of the
    matmul in ``out (2, b, N, D)``: x-factors, and y-factors × ``weight (b, N)``; zero outside the windows."""
    cols = torch.arange(means.shape[-1], device=means.device)
    out.zero_()
    out[0].scatter_(-1, j0[0, ..., None] + cols, means[0])
    out[1].scatter_(-1, j0[1, ..., None] + cols, means[1] * weight[..., None])
    return out


class _GatedProjection(torch.autograd.Function):
    """Axis-first layout ``(2, B, N, ...)``: each axis' factors of a chunk are one contiguous ``(b, N, D)``
    tensor, the form the batched matmul takes without copies. Only the window pixel means are kept for the
    backward, which rebuilds each chunk's dense factors: the dense factors of a whole batch are ``D / W``
    times larger (268 MB at 8,192 Gaussians, B = 64, D = 64), and allocating and zeroing them cost more than
    the matmuls."""

    @staticmethod
    def forward(ctx, xy, sigma, amplitudes, D: int, apix: float):
        # xy (2, B, N) Å
        _, B, N = xy.shape
        W = window_pixels(float(sigma.max()), D, apix)
        chunk = max(1, _FACTOR_ELEMENTS // (N * 2 * D))
        weight = amplitudes * sigma * math.sqrt(2.0 * math.pi)  # (B, N) z-integral of each peak
        scale = (sigma * math.sqrt(math.pi / 2.0) / apix)[:, None]  # (N, 1)
        j0 = window_start(xy, W, D, apix)  # (2, B, N)
        means = xy.new_empty((2, B, N, W))  # pixel means on each window
        buffer = xy.new_empty((2, min(chunk, B), N, D))
        img = xy.new_empty((B, D, D))
        for s in range(0, B, chunk):
            sl = slice(s, s + chunk)
            cdf = window_offsets(xy[:, sl], sigma, j0[:, sl], W, D, apix).erf_()  # (2, b, N, W+1)
            m = torch.sub(cdf[..., 1:], cdf[..., :-1]).mul_(scale)  # (2, b, N, W)
            means[:, sl] = m
            f = _dense_factors(buffer[:, : m.shape[1]], j0[:, sl], m, weight[sl])  # (2, b, N, D)
            torch.bmm(f[1].transpose(1, 2), f[0], out=img[sl])  # (b, D_y, D_x)
        ctx.save_for_backward(xy, sigma, amplitudes, weight, j0, means)
        ctx.D, ctx.apix, ctx.chunk = D, apix, chunk
        return img

    @staticmethod
    def backward(ctx, grad_img):
        xy, sigma, amplitudes, weight, j0, means = ctx.saved_tensors
        D, apix, chunk = ctx.D, ctx.apix, ctx.chunk
        _, B, N = xy.shape
        W = means.shape[-1]
        grad_img = grad_img.contiguous()
        grad_xy = torch.empty_like(xy)
        grad_weight = torch.empty_like(weight)
        grad_sigma_means = xy.new_zeros(N)
        cols = torch.arange(W, device=xy.device)
        buffer = xy.new_empty((2, min(chunk, B), N, D))
        g = torch.empty_like(buffer)
        for s in range(0, B, chunk):
            sl = slice(s, s + chunk)
            m = means[:, sl]  # (2, b, N, W)
            b = m.shape[1]
            f = _dense_factors(buffer[:, :b], j0[:, sl], m, weight[sl])
            G = grad_img[sl]  # (b, D_y, D_x)
            torch.bmm(f[1], G, out=g[0, :b])  # (b, N, D_x) d img / d fx
            torch.bmm(f[0], G.transpose(1, 2), out=g[1, :b])  # (b, N, D_y) d img / d(w fy)
            g_m = g[:, :b].gather(-1, j0[:, sl, :, None] + cols)  # (2, b, N, W) on the windows
            grad_weight[sl] = (g_m[1] * m[1]).sum(-1)
            g_m[1].mul_(weight[sl, :, None])
            u = window_offsets(xy[:, sl], sigma, j0[:, sl], W, D, apix)  # (2, b, N, W+1)
            e = torch.exp(-(u * u))
            grad_xy[:, sl] = (g_m * torch.sub(e[..., :-1], e[..., 1:])).sum(-1).div_(apix)  # exp(−u_lo²) − exp(−u_hi²)
            ue = e.mul_(u)
            due = torch.sub(ue[..., 1:], ue[..., :-1])  # (2, b, N, W) u_hi e_hi − u_lo e_lo
            dm_dsigma = (m / sigma[:, None]).sub_(due, alpha=math.sqrt(2.0) / apix)
            grad_sigma_means += (g_m * dm_dsigma).sum((0, 1, 3))
        sqrt2pi = math.sqrt(2.0 * math.pi)
        grad_amp = grad_weight * sigma * sqrt2pi
        grad_sigma = grad_sigma_means + (grad_weight * amplitudes).sum(0) * sqrt2pi
        return grad_xy, grad_sigma, grad_amp, None, None


def render_gaussians(
    centers: torch.Tensor,
    sigmas: torch.Tensor,
    amplitudes: torch.Tensor,
    rot: torch.Tensor,
    D: int,
    apix: float,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-integrated projections of per-image Gaussian mixtures → ``(B, D, D)`` indexed ``[y, x]``.

    centers ``(B, N, 3)`` or ``(N, 3)`` Å [x, y, z] relative to the box centre; sigmas ``(N,)`` Å;
    amplitudes ``(B, N)`` or ``(N,)`` density units; rot ``(B, 3, 3)`` (a centre μ lands at ``(R μ)_xy``);
    shifts ``(B, 2)`` px move the image by ``+t``. Differentiable in centers, sigmas and amplitudes.
    """
    B = rot.shape[0]
    centers = centers.expand(B, *centers.shape[-2:])
    xy = torch.einsum("bnj,bij->ibn", centers, rot[:, :2, :])  # (2, B, N) Å
    if shifts is not None:
        xy = xy + shifts.T[:, :, None] * apix
    amplitudes = amplitudes.expand(B, centers.shape[1]).contiguous()
    return _GatedProjection.apply(xy.contiguous(), sigmas.contiguous(), amplitudes, D, float(apix))
