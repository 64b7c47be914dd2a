"""Coarse-grained atomic models for deformation methods: one Gaussian per residue, and how residues move.

A base structure becomes one isotropic Gaussian per polymer residue at its representative atom (Cα, C1′
for nucleotides), σ = 2 Å by default, amplitude = the residue's electron count (sum of heavy-atom atomic
numbers, :func:`cryobench_lab.io.structures.read_structure`).

Placement: coordinates are stored relative to ``origin`` (the electron-weighted centre of the base
structure), so rotations turn the structure about its own centre; rendering adds ``offset`` back. With
``center=True`` the offset is zero (the structure sits at the box centre, for a file in an arbitrary
frame); with ``center=False`` the offset is ``origin`` itself, i.e. the file's coordinates are taken as Å
relative to the box centre — which is how the simulator writes ``gt_structures/`` (and how a structure
fitted into a consensus map and re-expressed about the box centre looks).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.models.components.gaussian_render import window_offsets, window_pixels, window_start
from cryobench_lab.io.structures import Structure, read_structure
from cryobench_lab.physics.rotations import quaternion_to_matrix


@dataclass
class ResidueGaussians:
    """Residue-level Gaussians of a base structure (numpy, float32).

    ``coords (n_res, 3)`` Å relative to ``origin``; ``amplitudes (n_res,)`` electrons; ``offset (3,)`` Å
    added when rendering (box frame); ``chain_ids (n_res,)``; ``structure`` the parsed file (for writing
    deformed models). Its atoms (without hydrogens and waters), to move with their residues, in the
    file's order: ``atom_coords (n_atoms, 3)`` Å relative to ``origin``, ``atom_numbers (n_atoms,)`` and
    ``atom_residue (n_atoms,)``, the residue each atom moves with (its own; an atom outside every residue,
    e.g. a ligand's or one of a residue without Cα/C1′, moves with the residue whose representative atom is
    nearest).
    """

    coords: np.ndarray
    amplitudes: np.ndarray
    origin: np.ndarray
    offset: np.ndarray
    chain_ids: np.ndarray
    structure: Structure
    atom_coords: np.ndarray
    atom_numbers: np.ndarray
    atom_residue: np.ndarray

    @property
    def n_residues(self) -> int:
        return len(self.coords)


def residue_gaussians(path: str | os.PathLike, center: bool = False) -> ResidueGaussians:
    """Read ``path`` (PDB/mmCIF) as one Gaussian per residue; see the module docstring for ``center``."""
    st = read_structure(path, keep_ligands=True)  # ligands move with their nearest residue
    if st.n_residues < 2:
        raise InputError(f"{path}: {st.n_residues} residue(s) with a CA or C1' atom; the segment VAE needs a polymer model")
    amps = st.residue_electrons.astype(np.float32)
    origin = (st.residue_coords * amps[:, None]).sum(0) / amps.sum()
    coords = (st.residue_coords - origin).astype(np.float32)
    offset = np.zeros(3, np.float32) if center else origin.astype(np.float32)
    atom_coords = (st.atom_coords - origin).astype(np.float32)
    atom_residue = st.atom_residue_index.copy()
    orphan = np.flatnonzero(atom_residue < 0)
    for s in range(0, len(orphan), 4096):  # (chunk, n_res) distances, bounded for large complexes
        rows = orphan[s : s + 4096]
        atom_residue[rows] = ((atom_coords[rows, None, :] - coords[None]) ** 2).sum(-1).argmin(1)
    return ResidueGaussians(coords, amps, origin.astype(np.float32), offset, st.residue_chain_ids, st,
                            atom_coords, st.atom_numbers.astype(np.float32), atom_residue)


def quaternion_vector_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rotations from quaternion vector parts ``v (..., 3)`` with real part 1 (normalised) → ``(..., 3, 3)``.

    ``v = 0`` is the identity; any ``v`` is a valid rotation, so a network can output it unconstrained.
    """
    q = torch.cat([torch.ones_like(v[..., :1]), v], dim=-1)  # (..., 4) as (w, x, y, z)
    return quaternion_to_matrix(q)


def move_by_segments(
    coords: torch.Tensor, weights: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor
) -> torch.Tensor:
    """Residues moved by their segments' rigid transforms blended by the segmentation weights.

    coords ``(n, 3)`` Å (relative to the rotation centre); weights ``(n, K)`` (rows sum to 1); rotations
    ``(B, K, 3, 3)``; translations ``(B, K, 3)`` Å → ``(B, n, 3)`` with
    ``x'_i = Σ_k w_ik (R_k x_i + t_k)``.
    """
    moved = torch.einsum("bkij,nj->bkni", rotations, coords) + translations[:, :, None, :]  # (B, K, n, 3)
    return torch.einsum("nk,bkni->bni", weights, moved)


def local_frames(coords: torch.Tensor, chain_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-residue local frames from the Cα trace → ``origins (n, 3)`` Å and ``axes (n, 3, 3)`` (columns).

    Origin of residue i: the midpoint of its chain neighbours i−1 and i+1 (at a chain end, the one
    neighbour and the residue itself); axis 1 along i−1 → i+1, axis 2 the component of (x_i − origin)
    orthogonal to it, axis 3 their cross product. A residue's rotation about this frame swings it about
    the line of its neighbours (the backbone's local bend), which is the only rotation a single isotropic
    Gaussian can show.
    """
    n = coords.shape[0]
    chain = np.zeros(n, np.int64) if chain_ids is None else np.unique(np.asarray(chain_ids), return_inverse=True)[1]
    idx = np.arange(n)
    prev = np.where((idx > 0) & (np.roll(chain, 1) == chain), idx - 1, idx)
    nxt = np.where((idx < n - 1) & (np.roll(chain, -1) == chain), idx + 1, idx)
    prev_t, nxt_t = torch.from_numpy(prev), torch.from_numpy(nxt)
    a, b = coords[prev_t], coords[nxt_t]  # (n, 3)
    origins = 0.5 * (a + b)
    e1 = b - a
    e1 = e1 / e1.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    u = coords - origins
    u = u - (u * e1).sum(-1, keepdim=True) * e1
    # a residue on the straight line of its neighbours: any perpendicular works
    fallback = torch.cross(e1, torch.tensor([0.0, 0.0, 1.0]).expand_as(e1), dim=-1)
    fallback = torch.where(fallback.norm(dim=-1, keepdim=True) < 1e-3, torch.cross(e1, torch.tensor([1.0, 0.0, 0.0]).expand_as(e1), dim=-1), fallback)
    u = torch.where(u.norm(dim=-1, keepdim=True) < 1e-3, fallback, u)
    e2 = u / u.norm(dim=-1, keepdim=True)
    e3 = torch.cross(e1, e2, dim=-1)
    return origins, torch.stack([e1, e2, e3], dim=-1)  # (n, 3), (n, 3, 3)


def move_per_residue(
    coords: torch.Tensor, origins: torch.Tensor, axes: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor
) -> torch.Tensor:
    """Residues moved one by one: a rotation about the residue's local frame, then a translation in it.

    coords, origins ``(n, 3)`` Å; axes ``(n, 3, 3)`` (frame axes as columns); rotations ``(B, n, 3, 3)`` and
    translations ``(B, n, 3)`` Å, both expressed in the local frame → ``(B, n, 3)``:
    ``x'_i = o_i + F_i (R_i F_iᵀ (x_i − o_i) + t_i)``.
    """
    local = torch.einsum("nji,nj->ni", axes, coords - origins)  # (n, 3) Fᵀ(x − o)
    moved = torch.einsum("bnij,nj->bni", rotations, local) + translations  # (B, n, 3) local frame
    return origins + torch.einsum("nij,bnj->bni", axes, moved)


# Sub-pixel positions of the profile table, a power of two so that splitting a position into pixel and
# sub-pixel is exact in floating point. A centre is rounded to 1/16384 px (≤ 3.1e-5 px; 4e-5 Å at
# 1.4 Å/px), which changes a pixel by ≤ ~7e-6 of the peak at σ = 1.4 px (~1.5e-5 at σ = 0.8 px).
_SUBPIXEL = 16384
_PROFILE_TABLES: dict = {}


def profile_table(sigma: float, D: int, apix: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """Every D-long pixel-factor row ``erf(u_hi) − erf(u_lo)`` of a 1D Gaussian of σ (Å) in a box of D pixels.

    The profile of a centre ``q/Q`` px past a pixel centre (``q = 0..Q − 1``, ``Q = _SUBPIXEL``) is nonzero
    over the pixel offsets ``−M..M`` only (M = 5σ in pixels + 2; beyond, below 6e-7 of the peak). The table
    lays these W = 2M + 1 values out one after another with D zeros between them, so a centre on any pixel
    from −M to D + M − 1 finds its D factors as ONE contiguous slice, reading the zeros around its profile
    → ``(rows, stride, M)``: ``rows[k]`` is the slice starting at element k, ``(Q·(W + D) + 1, D)``, and the
    profile of sub-pixel q starts at element ``D + q·stride``. Keeping only the profile's nonzero part
    (5.6 MB at D = 64, σ = 2 Å, 1.39 Å/px; a full row of ±(D + M) offsets per q took 9.8 MB) keeps more of
    the randomly read table in cache. Computed in float64 once per (σ, D, apix, dtype, device)."""
    key = (float(sigma), D, float(apix), dtype, device)
    if key not in _PROFILE_TABLES:
        # a centre more than M px outside the box is drawn M px out: still > 5σ from every pixel
        margin = math.ceil(5.0 * sigma / apix + 2.0)
        offsets = torch.arange(-margin, margin + 1, dtype=torch.float64)  # (W,) pixels
        frac = torch.arange(_SUBPIXEL, dtype=torch.float64) / _SUBPIXEL  # (Q,) pixels
        u = (offsets[None, :] - frac[:, None]) * (apix / (math.sqrt(2.0) * sigma))  # pixel centres, in √2σ
        half = apix / (2.0 * math.sqrt(2.0) * sigma)  # half a pixel, in √2σ
        profiles = torch.zeros(_SUBPIXEL, D + len(offsets), dtype=torch.float64)  # (Q, D + W): zeros, profile
        profiles[:, D:] = torch.erf(u + half) - torch.erf(u - half)
        flat = torch.cat([profiles.view(-1), profiles.new_zeros(D)]).to(dtype=dtype, device=device)
        rows = flat.as_strided((flat.numel() - D + 1, D), (1, 1))  # every D-long slice
        _PROFILE_TABLES[key] = (rows, profiles.shape[1], margin)
    return _PROFILE_TABLES[key]


def _pixel_factors(xy: torch.Tensor, weight: torch.Tensor, sigma: float, D: int, apix: float) -> torch.Tensor:
    """Each Gaussian's D pixel factors per axis, read from :func:`profile_table`.

    xy ``(B, 2, N)`` Å from the box centre (pixel D//2), weight ``(N,)`` → ``(B, 2, N, D)``; the y-factors
    carry each Gaussian's weight. The centre is rounded to a whole 1/Q px in xy's own precision: below 2²⁴
    steps (a float32 centre within ±1000 px) these are exact integers, and a float32 centre carries ~0.03
    steps of error anyway.
    """
    rows, stride, margin = profile_table(sigma, D, apix, xy.dtype, xy.device)
    steps = (xy * (_SUBPIXEL / apix)).round_()  # (B, 2, N) whole 1/Q px
    pixel = torch.floor(steps * (1.0 / _SUBPIXEL))  # from pixel D//2; exact, Q is a power of two
    q = torch.sub(steps, pixel, alpha=_SUBPIXEL)  # sub-pixel row in [0, Q)
    pixel.clamp_(-margin - D // 2, D + margin - 1 - D // 2)
    # the slice whose element j is pixel j: sub-pixel q's profile starts at D + q·stride, offset −M first
    start = q.mul_(stride).sub_(pixel).add_(D + margin - D // 2).long()  # (B, 2, N)
    m = rows.index_select(0, start.view(-1)).view(*xy.shape, D)
    m[:, 1].mul_(weight[:, None])
    return m


class _SeparableProjection(torch.autograd.Function):
    """Image ``Σ_n w_n f_y(n) ⊗ f_x(n)`` of separable pixel-integrated Gaussians; gradient w.r.t. the
    projected centres only (σ and amplitudes are constants of the residue model).

    Per axis and Gaussian, ``f(n)_j = erf(u_{j+1}) − erf(u_j)`` on the pixel edges ``e_j`` with
    ``u_j = (e_j − x_n) / (√2 σ)``; the constant ``σ√(π/2)/apix`` of each factor is folded into ``w``.
    Forward: all Gaussians share σ, so f depends only on where the centre sits within its pixel; each
    factor row is read as one slice of :func:`profile_table` (centre rounded to 1/16384 px), which leaves
    the batched matmul as the only arithmetic (computing the erfs and scattering their windows into the
    dense factors took 60 % of the time, BENCHMARKS.md, issue 5).
    Backward (exact, at the unrounded centres): ``∂f_j/∂x = 2/(√(2π) σ) (exp(−u_j²) − exp(−u_{j+1}²))``,
    and the factors' gradients are two batched matmuls with the image gradient; the exp pass runs on each
    Gaussian's ±5σ pixel window only (:func:`~cryobench_lab.models.components.gaussian_render.window_start`;
    the dropped tail is below 6e-7 of the peak).
    """

    @staticmethod
    def forward(ctx, xy, weight, sigma, D, apix):
        # xy (B, 2, N) Å (axis-major: each axis' factors are contiguous matrices for the matmuls);
        # weight (N,); sigma: the one σ (Å)
        m = _pixel_factors(xy, weight, sigma, D, apix)  # (B, 2, N, D)
        img = torch.bmm(m[:, 1].transpose(1, 2), m[:, 0])  # (B, D_y, D_x)
        ctx.save_for_backward(xy, weight, m)
        ctx.sigma, ctx.D, ctx.apix = sigma, D, apix
        return img

    @staticmethod
    def backward(ctx, grad_img):
        xy, weight, m = ctx.saved_tensors
        sigma, D, apix = ctx.sigma, ctx.D, ctx.apix
        W = window_pixels(sigma, D, apix)
        j0 = window_start(xy, W, D, apix)  # (B, 2, N)
        grad_img = grad_img.contiguous()
        g = torch.stack([torch.bmm(m[:, 1], grad_img),  # Σ_i w fy_i G_ij → d/d fx (B, N, D_x)
                         torch.bmm(m[:, 0], grad_img.transpose(1, 2))], 1)  # Σ_j fx_j G_ij → d/d(w fy) (B, N, D_y)
        g = g.gather(-1, j0[..., None] + torch.arange(W, device=xy.device))  # (B, 2, N, W)
        # exp(−u²), u² clamped at 80 (exp(−80) ≈ 2e-35): beyond it float32 results are denormal, which
        # the CPU computes ~100× slower, for values that do not matter
        e = window_offsets(xy, sigma, j0, W, D, apix).square_().clamp_(max=80.0).neg_().exp_()  # (B, 2, N, W+1)
        g.mul_(torch.sub(e[..., :-1], e[..., 1:]))
        grad_xy = g.sum(-1).mul_(2.0 / (math.sqrt(2.0 * math.pi) * sigma))  # (B, 2, N)
        grad_xy[:, 1].mul_(weight)
        return grad_xy, None, None, None, None


def project_residues(
    centers: torch.Tensor, sigma: float, amplitudes: torch.Tensor, rot: torch.Tensor, D: int, apix: float,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`cryobench_lab.physics.gaussians.project_gaussians` for Gaussians of ONE common σ, for training.

    Same arguments (centers ``(B, N, 3)`` or ``(N, 3)`` Å, amplitudes ``(N,)``, rot ``(B, 3, 3)``, shifts
    ``(B, 2)`` px) → ``(B, D, D)``; differentiable in ``centers`` (and ``rot``/``shifts``), not in σ or the
    amplitudes. The image is separable: per image, the pixel factors along x and y of every Gaussian,
    ``(B, N, D)`` each, and one batched matmul ``(B, D, N) @ (B, N, D)``. Each pixel's factor is the
    difference of ONE ``erf`` at its two edges (project_gaussians evaluates six erf/erfc branches to keep
    digits in the far tails, which a training loss does not need), read from :func:`profile_table` at the
    centre rounded to 1/16384 px: error ≤ 7e-6 of the peak at σ = 1.4 px (1.5e-5 at 0.8 px). The
    gradient is hand-written and exact at the unrounded centres (:class:`_SeparableProjection`): a few
    passes over the ±5σ window edges instead of autograd's many.
    """
    B = rot.shape[0]
    centers = centers.expand(B, *centers.shape[-2:])
    xy = torch.bmm(rot[:, :2], centers.transpose(1, 2))  # (B, 2, N) Å
    if shifts is not None:
        xy = xy + shifts[:, :, None] * apix
    # pixel mean = σ√(π/2)/apix · erf difference per axis; × σ√(2π) for the z-integral of each peak
    scale = (sigma * math.sqrt(math.pi / 2.0) / apix) ** 2 * sigma * math.sqrt(2.0 * math.pi)
    weight = (amplitudes * scale).to(xy.dtype)  # (N,)
    return _SeparableProjection.apply(xy, weight, float(sigma), D, float(apix))


def clash_penalty(coords: torch.Tensor, clash_pairs: torch.Tensor, n_clash_pairs: int, threshold: float) -> torch.Tensor:
    """Mean of ``relu(c² − d²)² / c⁴`` over the pairs of ``clash_pairs (n, n)`` (bool, i < j: the non-neighbour
    pairs, ``n_clash_pairs`` of them) for coords (B, n, 3) Å, c = ``threshold`` Å; 0 when no pair is closer.

    Only pairs closer than c contribute (value and gradient), and they are few: they are found without
    gradient from ``|a|² + |b|² − 2a·b`` (one batched matmul, with a 1 Å² margin for its rounding), and
    the penalty is evaluated exactly on them. Same value and gradient as over all (B, n, n) pairs.
    """
    c2 = threshold**2
    with torch.no_grad():
        sq = (coords * coords).sum(-1, keepdim=True)  # (B, n, 1)
        ones = torch.ones_like(sq)
        # d²_ij = [x_i, |x_i|², 1] · [−2x_j, 1, |x_j|²] as one batched matmul → (B, n, n)
        d2 = torch.bmm(torch.cat([coords, sq, ones], -1), torch.cat([-2 * coords, ones, sq], -1).transpose(1, 2))
        b, i, j = torch.nonzero(d2 < c2 + 1.0, as_tuple=True)  # few: near pairs, bonded neighbours, i = j
        keep = clash_pairs[i, j]  # non-neighbour pairs, i < j
        b, i, j = b[keep], i[keep], j[keep]
    d2 = ((coords[b, i] - coords[b, j]) ** 2).sum(-1)  # (n_close,)
    return (torch.relu(c2 - d2) ** 2).sum() / (c2**2 * coords.shape[0] * n_clash_pairs)
