"""Fourier-space neural fields: K volumes' spectra as MLPs of the 3D frequency coordinate.

A field maps a 3D frequency ``k`` (cycles/box, index units, the output of
:func:`cryobench_lab.physics.slicing.slice_coordinates`), a conformation latent ``z`` and a class ``c`` to
the complex value of that class's 3D spectrum ``F_c(k; z)`` at the image's scale: the 2D transform of a
projection is ``F`` on the central slice (docs/conventions.md), so a volume is ``ifft3(F) / apix``.

Hermitian symmetry ``F(-k) = conj F(k)`` (real volumes) is built in: the network only ever sees the
canonical half-space ``kz >= 0``; a point with ``kz < 0`` is evaluated at ``-k`` and conjugated. Images are
therefore evaluated on half of the 2D plane and volumes on half of the 3D grid.

The network input is a Gaussian Fourier feature map of ``u = k / D`` (cycles/px):
``[cos 2π u·B, sin 2π u·B]`` with ``B ~ N(0, s²)`` (3, n_features), ``s`` in pixels (the spatial scale
the features resolve). The network output is multiplied by a radial amplitude profile estimated from the
data (:attr:`FourierField.amplitude`), so the MLP works on O(1) numbers at every resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cryobench_lab.physics.lattice import freq_grid_3d


def fast_bf16(device_type: str) -> bool:
    """Whether bfloat16 matrix products are native (faster than float32) on this kind of device."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":  # AMX tiles or AVX512-BF16 instructions; torch only exposes private probes
        probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(probe() for probe in probes if probe is not None)
    return False


class GaussianFourierFeatures(nn.Module):
    """``[cos 2π u·B, sin 2π u·B]`` for coordinates ``u (..., 3)`` → ``(..., 2 · n_features)``.

    ``B (3, n_features) ~ N(0, scale²)``; with ``u`` in cycles/px, ``scale`` is in pixels.
    """

    def __init__(self, n_features: int, scale: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(3, n_features, generator=g) * scale)

    @property
    def out_dim(self) -> int:
        return 2 * self.B.shape[1]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        phase = (2.0 * math.pi) * (u @ self.B)  # (..., n_features)
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class MLPStack(nn.Module):
    """``n_nets`` independent residual ReLU MLPs of the same shape, weights stacked on the first axis.

    Layers: ``in → hidden``, ``n_layers`` residual ``hidden → hidden``, ``hidden → out`` (the meaning of
    cryoDRGN's ``--dec-layers``, so equal settings give equal networks). The first layer is split into a part for the
    shared features and a part for per-pair extras (latent, class embedding), so features are never
    concatenated with a per-pair vector at every point.
    """

    def __init__(self, n_nets: int, feat_dim: int, extra_dim: int, hidden: int, n_layers: int, out_dim: int):
        super().__init__()
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0, got {n_layers}")

        def linear(n_in: int, n_out: int, scale: float = 1.0) -> tuple[nn.Parameter, nn.Parameter]:
            bound = scale / math.sqrt(max(n_in, 1))  # nn.Linear's default range, optionally shrunk
            w = nn.Parameter(torch.empty(n_nets, n_out, n_in).uniform_(-bound, bound))
            b = nn.Parameter(torch.empty(n_nets, n_out).uniform_(-bound, bound))
            return w, b

        self.w_feat, self.b_in = linear(feat_dim + extra_dim, hidden)
        # the extra (per-pair) columns of the first layer, split from the feature columns
        self.w_extra = nn.Parameter(self.w_feat.data[:, :, feat_dim:].clone()) if extra_dim else None
        self.w_feat = nn.Parameter(self.w_feat.data[:, :, :feat_dim].contiguous())
        hidden_layers = [linear(hidden, hidden) for _ in range(n_layers)]
        self.w_hidden = nn.ParameterList([w for w, _ in hidden_layers])
        self.b_hidden = nn.ParameterList([b for _, b in hidden_layers])
        # small output layer: the initial prediction is close to zero (residual = data)
        self.w_out, self.b_out = linear(hidden, out_dim, scale=1e-2)

    def first_layer_features(self, feat: torch.Tensor, net: int) -> torch.Tensor:
        """Feature part of the first layer for network ``net``: ``feat (..., F)`` → ``(..., hidden)``."""
        return F.linear(feat, self.w_feat[net], self.b_in[net])

    def first_layer_extra(self, extra: torch.Tensor, net: int) -> torch.Tensor:
        """Per-pair part of the first layer: ``extra (M, E)`` → ``(M, hidden)``."""
        return F.linear(extra, self.w_extra[net])

    def rest(self, h: torch.Tensor, net: int) -> torch.Tensor:
        """Pre-activation of the first layer ``h (..., hidden)`` → output ``(..., out_dim)``."""
        h = torch.relu(h)
        for w, b in zip(self.w_hidden, self.b_hidden):
            h = torch.relu(h + F.linear(h, w[net], b[net]))
        return F.linear(h, self.w_out[net], self.b_out[net])


def canonical_half_space(coords: torch.Tensor) -> torch.Tensor:
    """True where a 3D frequency is in the canonical half: ``kz > 0``, or ``kz = 0`` and ``ky > 0``, or
    ``kz = ky = 0`` and ``kx >= 0``. ``coords (..., 3)`` as ``[kx, ky, kz]`` → bool ``(...)``."""
    kx, ky, kz = coords.unbind(-1)
    return (kz > 0) | ((kz == 0) & ((ky > 0) | ((ky == 0) & (kx >= 0))))


class FourierField(nn.Module):
    """K neural fields for the spectra of K classes, each conditioned on a latent of dimension d.

    ``shared=False``: K separate MLPs. ``shared=True``: one MLP with a learned class embedding as an extra
    input (its feature layer is computed once per point and reused by every class). ``bf16``: run the MLP's
    matrix products in bfloat16 (autocast; features, outputs and the loss stay float32); None turns it on
    where the hardware has native bfloat16 (:func:`fast_bf16`).
    """

    def __init__(
        self,
        box_size: int,
        n_classes: int,
        latent_dim: int,
        hidden_dim: int = 256,
        n_layers: int = 3,
        n_features: int = 96,
        feature_scale: float = 0.08,
        shared: bool = False,
        class_embedding_dim: int = 8,
        bf16: bool | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.bf16 = bf16
        self.D = box_size
        self.n_classes = n_classes
        self.latent_dim = latent_dim
        self.shared = shared and n_classes > 1
        # feature_scale is a fraction of the half box: B's spread in px
        self.features = GaussianFourierFeatures(n_features, feature_scale * box_size / 2, seed=seed)
        self.class_embedding = nn.Embedding(n_classes, class_embedding_dim) if self.shared else None
        extra = latent_dim + (class_embedding_dim if self.shared else 0)
        self.mlp = MLPStack(1 if self.shared else n_classes, self.features.out_dim, extra, hidden_dim, n_layers, 2)
        # radial amplitude of the spectrum per integer shell 0..D/2 (set from data; 1 until then)
        self.register_buffer("amplitude", torch.ones(box_size // 2 + 1))

    def _envelope(self, radius: torch.Tensor) -> torch.Tensor:
        """Linearly interpolated :attr:`amplitude` at radii ``radius`` (index units)."""
        r = radius.clamp(max=self.amplitude.numel() - 1)
        lo = r.floor().long().clamp(max=self.amplitude.numel() - 2)
        frac = r - lo
        return self.amplitude[lo] * (1 - frac) + self.amplitude[lo + 1] * frac

    def forward(
        self,
        coords: torch.Tensor,
        z: torch.Tensor | None,
        image: torch.Tensor,
        classes: torch.Tensor,
    ) -> torch.Tensor:
        """Complex spectrum values for M (image, class) pairs.

        coords (B, P, 3) frequencies (cycles/box) of each image's P points; z (M, d) or None (d = 0);
        image (M,) which image each pair uses; classes (M,) its class → (M, P, 2) as ``[re, im]``.
        """
        flip = ~canonical_half_space(coords)  # (B, P)
        canon = torch.where(flip[..., None], -coords, coords)
        feat = self.features(canon / self.D)  # (B, P, 2F)
        extra = self._extra(z, classes)  # (M, E) or None
        bf16 = fast_bf16(coords.device.type) if self.bf16 is None else self.bf16
        with torch.autocast(coords.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = self._mlp(feat, extra, image, classes).float()
        # conj for points mirrored into the half; the zero frequency is its own mirror, so real
        sign = torch.where(flip, -1.0, 1.0).masked_fill((coords == 0).all(-1), 0.0).to(out.dtype)[image]
        envelope = self._envelope(coords.norm(dim=-1))[image]  # (M, P)
        return torch.stack([out[..., 0] * envelope, out[..., 1] * sign * envelope], dim=-1)

    def _mlp(self, feat: torch.Tensor, extra: torch.Tensor | None, image: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Raw network outputs (M, P, 2) of the pairs' classes on their images' features (B, P, 2F)."""
        if self.shared:
            h_feat = self.mlp.first_layer_features(feat, 0)  # (B, P, hidden): once per image, for every class
            h = h_feat[image] + self.mlp.first_layer_extra(extra, 0)[:, None, :]
            return self.mlp.rest(h, 0)
        out = feat.new_empty(len(image), feat.shape[1], 2)
        every_image = torch.arange(feat.shape[0], device=feat.device)
        for c in classes.unique().tolist():
            sel = torch.nonzero(classes == c).squeeze(1)
            images_c = image[sel]
            # no gather (a copy of the features) when the class is evaluated on every image in order
            feat_c = feat if torch.equal(images_c, every_image) else feat[images_c]
            h = self.mlp.first_layer_features(feat_c, c)  # (m, P, hidden)
            if extra is not None:
                h = h + self.mlp.first_layer_extra(extra[sel], c)[:, None, :]
            y = self.mlp.rest(h, c).to(out.dtype)
            if len(classes) == len(sel):
                return y  # one class: the pairs are already in order
            out = out.index_copy(0, sel, y)
        return out

    def _extra(self, z: torch.Tensor | None, classes: torch.Tensor) -> torch.Tensor | None:
        parts = []
        if self.latent_dim:
            parts.append(z)
        if self.shared:
            parts.append(self.class_embedding(classes))
        return torch.cat(parts, dim=-1) if parts else None

    @torch.no_grad()
    def volume_spectrum(self, z: torch.Tensor | None, cls: int, chunk: int = 1 << 15) -> torch.Tensor:
        """Centred 3D spectrum (D, D, D) complex of class ``cls`` at latent ``z (d,)`` (None for d = 0).

        The field is evaluated on the canonical half of the ball ``|k| < D/2`` and mirrored by Hermitian
        symmetry; outside the ball the spectrum is zero.
        """
        D = self.D
        grid = freq_grid_3d(D, device=self.amplitude.device)  # (D, D, D, 3) [kx, ky, kz]
        inside = (grid.square().sum(-1) < (D / 2) ** 2) & canonical_half_space(grid)
        idx = torch.nonzero(inside.reshape(-1)).squeeze(1)  # (Q,)
        pts = grid.reshape(-1, 3)[idx]
        values = []
        for start in range(0, len(pts), chunk):
            block = pts[start : start + chunk][None]  # (1, q, 3)
            zz = None if z is None else z.reshape(1, -1).to(block)
            values.append(self(block, zz, torch.zeros(1, dtype=torch.long, device=block.device),
                               torch.full((1,), cls, dtype=torch.long, device=block.device))[0])
        v = torch.cat(values)  # (Q, 2)
        spectrum = torch.zeros(D**3, dtype=torch.complex64, device=grid.device)
        spectrum[idx] = torch.complex(v[:, 0], v[:, 1])
        # mirror: index j ↔ D - j on each axis (k ↔ -k); |k| < D/2 keeps j >= 1 so the mirror is in range
        zi, yi, xi = idx // (D * D), (idx // D) % D, idx % D
        mirror = ((D - zi) * D + (D - yi)) * D + (D - xi)
        spectrum[mirror] = torch.complex(v[:, 0], -v[:, 1])
        centre = (D // 2 * D + D // 2) * D + D // 2
        spectrum[centre] = spectrum[centre].real.clone()  # the zero frequency of a real volume is real
        return spectrum.reshape(D, D, D)
