"""Training renderer for Gaussian mixtures whose amplitudes change per image (gated mixtures).

Same image as :func:`cryobench_lab.physics.gaussians.project_gaussians` (pixel-integrated projection,
``(B, D, D)`` indexed ``[y, x]``, amplitude·Å) but with

- per-image amplitudes ``(B, N)`` and per-Gaussian σ ``(N,)`` (``components.atoms.project_residues``
  takes one σ and per-Gaussian amplitudes only);
- ONE ``erf`` per pixel edge (project_gaussians keeps the far-tail digits with six erf/erfc branches,
  which a training loss does not need);
- a window per Gaussian: pixel factors are evaluated only within ±5σ of the centre (tails below 6e-7 of
  the peak are dropped) and scattered into the dense ``(B, N, D)`` factors of the batched matmul;
  elementwise passes over the ``(B, N, 2, D + 1)`` edge tensor, not the matmul, dominate at D = 64
  (profiled), and the window cuts them by ``D / W``;
- a hand-written backward: autograd through ``erf``, the edge differences and the slices walks the edge
  tensor about twenty times; here the backward recomputes ``exp(−u²)`` once on the window.

Derivatives, for one axis with ``u_e = (e − x) / (√2 σ)`` at the pixel edges ``e`` and the pixel mean
``m = σ√(π/2)/apix · (erf(u_hi) − erf(u_lo))``: ``∂m/∂x = (exp(−u_lo²) − exp(−u_hi²)) / apix`` and
``∂m/∂σ = m/σ − √2/apix · (u_hi exp(−u_hi²) − u_lo exp(−u_lo²))``.
"""

from __future__ import annotations

import math

import torch

# Elements per (b, N, 2, D) factor chunk: bounds the working set (≈ 64 MB of float32 per tensor).
_FACTOR_ELEMENTS = 1 << 24
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


def _window(xy: torch.Tensor, sigma: torch.Tensor, D: int, apix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each Gaussian's pixel window along x and y → first pixel ``j0 (b, N, 2)`` int64 and the window's
    ``W + 1`` edges in Å ``(b, N, 2, W + 1)`` (:func:`window_pixels`, :func:`window_start`)."""
    W = window_pixels(float(sigma.max()), D, apix)
    j0 = window_start(xy, W, D, apix)  # (b, N, 2)
    k = torch.arange(W + 1, device=xy.device, dtype=xy.dtype)
    edges = (j0[..., None].to(xy.dtype) + k - D // 2 - 0.5) * apix  # (b, N, 2, W+1) Å
    return j0, edges


def _window_offsets(xy, sigma, edges) -> torch.Tensor:
    """u = (edge − x) / (√2 σ) on the window edges → (b, N, 2, W + 1)."""
    return (edges - xy[..., None]) * (1.0 / (math.sqrt(2.0) * sigma))[None, :, None, None]


class _GatedProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xy, sigma, amplitudes, D: int, apix: float):
        B, N, _ = xy.shape
        chunk = max(1, _FACTOR_ELEMENTS // (N * 2 * D))
        img = xy.new_empty((B, D, D))
        means = xy.new_zeros((B, N, 2, D))  # dense pixel means, zero outside each window
        weight = amplitudes * sigma * math.sqrt(2.0 * math.pi)  # (B, N) z-integral of each peak
        scale = (sigma * math.sqrt(math.pi / 2.0) / apix)[None, :, None, None]
        j0s = []
        for s in range(0, B, chunk):
            sl = slice(s, s + chunk)
            j0, edges = _window(xy[sl], sigma, D, apix)
            cdf = torch.erf(_window_offsets(xy[sl], sigma, edges))  # (b, N, 2, W+1)
            m = torch.sub(cdf[..., 1:], cdf[..., :-1]).mul_(scale)  # (b, N, 2, W) window pixel means
            W = m.shape[-1]
            means[sl].scatter_(-1, j0[..., None] + torch.arange(W, device=xy.device), m)
            fy = means[sl, :, 1] * weight[sl, :, None]  # (b, N, D) over y, weighted
            img[sl] = torch.bmm(fy.transpose(1, 2), means[sl, :, 0])  # (b, D_y, D_x)
            j0s.append(j0)
        ctx.save_for_backward(xy, sigma, amplitudes, weight, means, torch.cat(j0s))
        ctx.D, ctx.apix, ctx.chunk = D, apix, chunk
        return img

    @staticmethod
    def backward(ctx, grad_img):
        xy, sigma, amplitudes, weight, means, j0_all = ctx.saved_tensors
        D, apix, chunk = ctx.D, ctx.apix, ctx.chunk
        B, N, _ = xy.shape
        grad_xy = torch.empty_like(xy)
        grad_weight = torch.empty_like(weight)
        grad_sigma_means = xy.new_zeros(N)
        for s in range(0, B, chunk):
            sl = slice(s, s + chunk)
            G = grad_img[sl]  # (b, D_y, D_x)
            mx, my = means[sl, :, 0], means[sl, :, 1]  # (b, N, D)
            g_my = torch.bmm(mx, G.transpose(1, 2))  # (b, N, D_y) d img / d fy
            g_mx = torch.bmm(my * weight[sl, :, None], G)  # (b, N, D_x) d img / d fx
            grad_weight[sl] = (g_my * my).sum(-1)
            _, edges = _window(xy[sl], sigma, D, apix)
            W = edges.shape[-1] - 1
            idx = j0_all[sl][..., None] + torch.arange(W, device=xy.device)  # (b, N, 2, W)
            g_m = torch.stack([g_mx, g_my.mul_(weight[sl, :, None])], dim=2).gather(-1, idx)  # (b, N, 2, W)
            m = means[sl].gather(-1, idx)
            u = _window_offsets(xy[sl], sigma, edges)  # (b, N, 2, W+1)
            e = torch.exp(-(u * u))
            de = torch.sub(e[..., :-1], e[..., 1:])  # (b, N, 2, W) exp(−u_lo²) − exp(−u_hi²)
            grad_xy[sl] = (g_m * de).sum(-1) / apix
            ue = e.mul_(u)
            due = torch.sub(ue[..., 1:], ue[..., :-1])  # (b, N, 2, W) u_hi e_hi − u_lo e_lo
            dm_dsigma = m / sigma[None, :, None, None] - (math.sqrt(2.0) / apix) * due
            grad_sigma_means += (g_m * dm_dsigma).sum((0, 2, 3))
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
    xy = torch.einsum("bnj,bij->bni", centers, rot[:, :2, :])  # (B, N, 2) Å
    if shifts is not None:
        xy = xy + shifts[:, None, :] * apix
    amplitudes = amplitudes.expand(B, centers.shape[1]).contiguous()
    return _GatedProjection.apply(xy.contiguous(), sigmas.contiguous(), amplitudes, D, float(apix))
