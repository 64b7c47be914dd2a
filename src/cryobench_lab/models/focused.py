"""Focused classification with signal subtraction (``model=focused``).

Inputs: a mask (``model.mask``, ``.mrc``, values in [0, 1]) around the region of interest, and a consensus
volume: ``model.consensus`` (``.mrc``), or, when unset, the Wiener backprojection of all particles without
labels (:class:`~cryobench_lab.models.backproject.Backprojection` with ``use_labels=False``).

Signal subtraction: every image loses the CTF-modulated projection of the consensus density outside the
mask, ``X_i − CTF_i · P_{R_i}(a · V_cons · (1 − M))`` (observed frame: the projection is moved by −t_i).
``a`` is the least-squares scale of the consensus projections against the images (1 for a consensus built
from the same images up to Wiener shrinkage; it absorbs an arbitrary scale of a user map). The projector is
the simulator's (trilinear on a 2× oversampled spectrum with the gridding correction), not the nearest-neighbour grid of the
classifier, so subtraction errors are those of an accurate projector.

Classification: :class:`~cryobench_lab.models.multiclass.MulticlassEM` on the subtracted images, with each
class volume restricted to the mask after every M-step (real-space product, as RELION's masked references).
``pose_search="local"`` re-aligns the masked region locally. The evaluation contract decodes full volumes
(the consensus outside the mask plus the class's masked region), so the shared scorer compares them with
whole ground-truth states.

Outputs in ``classes/``: those of ``multiclass`` (the class volumes there are the masked regions), plus, with
``write_subtracted=true``, ``subtracted.mrcs`` and ``subtracted.star`` at the training box (poses, shifts
and CTF of the particles; the images' original sign and intensity scale), for RELION.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cryobench_lab.data.ground_truth import fourier_crop_3d
from cryobench_lab.data.particles import DatasetInfo
from cryobench_lab.data.simulate import slice_spectrum
from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import read_mrc, write_mrc, write_stack
from cryobench_lab.io.star import write_particle_star
from cryobench_lab.models.backproject import Backprojection
from cryobench_lab.models.multiclass import MulticlassEM
from cryobench_lab.physics.fft import fft2_center, fft3_center, ifft2_center, ifft3_center
from cryobench_lab.physics.shift import phase_ramp
from cryobench_lab.physics.slicing import extract_slices


def load_map(path: str, what: str, D: int, apix: float) -> torch.Tensor:
    """A cubic map at the training box ``D`` (Fourier-cropped when it was saved at a larger box) → (D, D, D).

    The map's voxel size must match the data's at its own box (1 % tolerance); unset headers are trusted.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model.{what}: {p} does not exist; pass an .mrc at the particles' pixel size")
    vol, map_apix = read_mrc(p)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"{p}: model.{what} has shape {vol.shape}; expected a cubic (D, D, D) map")
    D0 = vol.shape[0]
    if D0 < D:
        raise InputError(f"{p}: model.{what} box {D0} is smaller than the training box {D}; pass a map at box >= {D}")
    if map_apix > 0 and abs(map_apix * D0 / D - apix) > 0.01 * apix:
        raise InputError(
            f"{p}: model.{what} voxel size {map_apix:g} Å at box {D0} is {map_apix * D0 / D:g} Å at the training box "
            f"{D}, but the particles have {apix:g} Å; resample the map to the particles' pixel size"
        )
    return fourier_crop_3d(torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32)), D)


class FocusedClassification(MulticlassEM):
    """Signal subtraction outside a mask, then multiclass EM restricted to it; see the module docstring.

    Args: ``mask`` and ``consensus`` (paths, see above), ``write_subtracted`` (write the subtracted stack),
    and every argument of :class:`MulticlassEM`.
    """

    def __init__(
        self,
        info: DatasetInfo,
        name: str = "focused",
        mask: str | None = None,
        consensus: str | None = None,
        write_subtracted: bool = False,
        n_classes: int = 3,
        epochs: int = 10,
        pca_passes: int = 4,
        pad: int = 2,
        noise: str = "image",
        prior_update: bool = True,
        pose_search: str = "none",
        local_step_deg: float | None = None,
        shift_step_px: float = 1.0,
        sphere_mask: bool = True,
        seed: int = 0,
    ):
        if not mask:
            raise InputError(
                "model.mask is not set; pass model.mask=/path/to/mask.mrc (build one with python -m "
                "cryobench_lab.make_mask)"
            )
        super().__init__(info, name, n_classes, epochs, pca_passes, pad, noise, prior_update, pose_search, local_step_deg,
                         shift_step_px, sphere_mask, seed)
        focus = load_map(mask, "mask", self.D, self.apix).clamp(0.0, 1.0)  # (D, D, D)
        if float(focus.max()) <= 0.0:
            raise InputError(f"{mask}: model.mask is zero everywhere; pass a mask with ones over the region of interest")
        self.register_buffer("focus", focus)
        self.register_buffer("outside", torch.zeros(self.D, self.D, self.D))  # a · V_cons · (1 − M)
        # saved with the checkpoint, so a reloaded model subtracts without recomputing the consensus
        self.register_buffer("outside_spectrum", slice_spectrum(self.outside))
        self.consensus_path = consensus
        self.register_buffer("consensus_ready", torch.tensor(False))  # a resumed run keeps its subtraction

    # ---- consensus and subtraction ---------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if not bool(self.consensus_ready):
            self.prepare_consensus(self.trainer.datamodule.all_dataloader())

    @torch.no_grad()
    def prepare_consensus(self, loader, consensus: torch.Tensor | None = None) -> None:
        """Consensus (given, from ``model.consensus``, or backprojected from ``loader``), scaled to the images
        by least squares; fills ``outside`` and its spectrum."""
        if consensus is None and self.consensus_path:
            consensus = load_map(self.consensus_path, "consensus", self.D, self.apix)
        if consensus is None:
            oracle = Backprojection(self.info, use_labels=False).to(self.device)
            for i, batch in enumerate(loader):
                oracle.training_step({k: v.to(self.device) for k, v in batch.items()}, i)
            oracle.solve()
            consensus = oracle.volumes[0]
        consensus = consensus.to(self.device)
        spectrum = slice_spectrum(consensus)
        cross, power = 0.0, 0.0
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            model = self._render(spectrum, batch)  # (B, D, D) re-centred CTF · P(V_cons)
            Y = fft2_center(batch["images"]) * phase_ramp(batch["trans"], self.D)
            cross += float((Y.conj() * model).real.sum())
            power += float(model.abs().square().sum())
        scale = cross / max(power, 1e-30)
        self.outside.copy_(scale * consensus * (1.0 - self.focus))
        self.outside_spectrum = slice_spectrum(self.outside)
        self.consensus_ready.fill_(True)

    def _render(self, spectrum: torch.Tensor, batch: dict) -> torch.Tensor:
        """Re-centred CTF-modulated projections of a 2× oversampled spectrum, (B, D, D) complex."""
        proj = extract_slices(spectrum, batch["rot"], self.D)  # (B, D, D)
        ctf = self.ctf(batch)
        return proj if ctf is None else proj * ctf

    def subtracted_spectra(self, batch: dict) -> torch.Tensor:
        """Re-centred spectra of the images minus the outside-mask consensus projections, (B, D, D) complex."""
        Y = fft2_center(batch["images"]) * phase_ramp(batch["trans"], self.D)
        return Y - self._render(self.outside_spectrum.to(Y.device), batch)

    def observations(self, batch: dict) -> torch.Tensor:
        return self.grid.take(self.subtracted_spectra(batch))

    def constrain(self, spectra: torch.Tensor) -> torch.Tensor:
        """Each class volume multiplied by the mask in real space (on the P box; zero outside the D box)."""
        D, P = self.D, self.grid.P
        lo = P // 2 - D // 2
        support = torch.nn.functional.pad(self.focus, (lo, P - D - lo) * 3)  # (P, P, P)
        return fft3_center(ifft3_center(spectra).real * support).to(spectra.dtype)

    # ---- evaluation contract ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latent: torch.Tensor | None, classes: torch.Tensor | None) -> torch.Tensor:
        """Whole volumes: the consensus outside the mask plus each class's masked region."""
        return super().decode(latent, classes) + self.outside[None]

    # ---- outputs ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_outputs(self, out_dir: Path, datamodule) -> dict:
        out_dir = Path(out_dir)
        summary = super().write_outputs(out_dir, datamodule)
        write_mrc(out_dir / "consensus_outside_mask.mrc", self.outside.cpu().numpy(), apix=self.apix)
        if self.hparams.write_subtracted:
            self.write_subtracted_stack(out_dir, datamodule)
        return summary

    @torch.no_grad()
    def write_subtracted_stack(self, out_dir: Path, datamodule) -> None:
        """``subtracted.mrcs`` + ``subtracted.star`` at the training box, in the input's sign and scale."""
        dataset = datamodule.dataset
        images = []
        for batch in datamodule.all_dataloader():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            back = self.subtracted_spectra(batch) * phase_ramp(-batch["trans"], self.D)  # observed frame
            images.append(ifft2_center(back).real.cpu())
        stack = torch.cat(images) / dataset.scale * (-1.0 if dataset.invert else 1.0)  # (N, D, D)
        mrcs = (Path(out_dir) / "subtracted.mrcs").resolve()
        write_stack(mrcs, stack.numpy(), apix=self.apix)
        names = [f"{i + 1}@{mrcs.name}" for i in range(len(stack))]  # beside the star file
        ctf = dataset.ctf.numpy() if dataset.ctf is not None else None
        write_particle_star(Path(out_dir) / "subtracted.star", names, dataset.rot.numpy(), dataset.trans.numpy(),
                            ctf, apix=self.apix, D=self.D)
