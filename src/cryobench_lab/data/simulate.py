"""Particle simulator: atomic states → a CryoBench-style particle dataset on disk.

A *state* (:class:`State`) is a set of atoms (coordinates in Å, atomic numbers). A dataset mixes several
states (compositional and/or conformational heterogeneity) and records which state produced each image.

Density model (the same for the images and the ground-truth volumes)
    One isotropic Gaussian per heavy atom (hydrogens and waters are dropped on load), holding the atom's
    electron count ``Z``: ``ρ(r) = Σ_a Z_a · N(r; x_a, σ²)``, so the density is in e/Å³ and integrates to
    the number of electrons. All atoms share one blur ``σ`` (Å), which stands for the resolution limit
    of the map (atomic form factors and thermal motion, ≤ 1 Å, are folded into it):

    - default ``σ = max(1 Å, 0.75·apix)``. A Gaussian's Fourier amplitude is ``exp(−2π²σ²s²)``; at
      Nyquist (``s = 1/(2·apix)``) that is ``exp(−π²·0.75²/2) = 6 %``, so the map is band-limited just
      below Nyquist and pixel-, voxel- and Fourier-slice renderings of it agree: measured on 3HSY at
      D=64, projections of the voxelised volume vs. exact pixel-integrated projections of the Gaussians
      correlate ≥ 0.999 per Fourier shell up to 0.75·Nyquist and 0.994 at 0.875·Nyquist. With
      ``0.5·apix`` (29 % amplitude at Nyquist) the same shells drop to 0.97 and 0.80: that map is not
      sampled finely enough to have a single well-defined projection. The amplitude falls to one half
      at ≈ 0.5·Nyquist.
    - ``b_factor`` (Å²) overrides it: ``σ = √(B / 8π²)`` (the Debye–Waller relation; the density's
      spectrum is then multiplied by ``exp(−B s²/4)``, the envelope convention of physics/ctf.py).

Rendering
    Each state is voxelised once, exactly (voxel-integrated Gaussians, physics/gaussians.py); that
    volume is written as the ground truth and its images are Fourier slices of it (physics/slicing.py,
    2× zero padding, trilinear interpolation) with a gridding correction: trilinear interpolation of the
    spectrum multiplies the real-space volume by ``sinc²(x / (2D))`` per axis, so the volume is divided
    by that first (halves the error: 4.2 % → 2.6 % relative to exact pixel-integrated projections). A
    Fourier slice costs O(D²) per image whatever the number of atoms; the exact real-space projection
    costs O(N·D) erf evaluations per image and takes minutes for a 30,000-atom complex.

Image formation (docs/conventions.md)
    ``clean = ±(CTF ⊛ shift(P_R(V), −t))`` with ``P_R`` the line integral (e/Å²) under the pose ``R``,
    ``t`` the stored re-centring shift (px), and the minus sign when ``invert`` (CryoBench: the
    projection is negated; the DataModule inverts again on load so the density is positive in
    training). ``image = clean + n``, ``n ~ N(0, σ_n²)`` white, ``σ_n² = var(clean) / SNR`` with
    ``var(clean)`` the variance over every pixel of every clean image of the dataset.

Randomness
    Poses are uniform on SO(3), shifts uniform in ``±shift_range_px`` per axis, defocus U uniform in
    ``defocus_range``, ``V = U − astigmatism``, astigmatism angle uniform in [0°, 180°), particle order
    shuffled. Parameters and noise come from two generators seeded from ``seed``, so a run with
    ``snr=None`` (no noise) reproduces exactly the clean images of a noisy run with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import torch
from tqdm.auto import tqdm

from cryobench_lab import __version__
from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import write_mrc
from cryobench_lab.io.pickles import save_ctf, save_poses
from cryobench_lab.io.star import write_particle_star
from cryobench_lab.io.structures import read_models, read_structure
from cryobench_lab.physics.ctf import ctf_image
from cryobench_lab.physics.fft import ifft2_center
from cryobench_lab.physics.gaussians import (
    BLUR_SIGMA_PER_APIX,
    MIN_BLUR_SIGMA,
    atom_amplitudes,
    band_limited_sigma,
    voxelize_gaussians,
)
from cryobench_lab.physics.rotations import random_rotations
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import extract_slices, volume_spectrum

# Bump when the simulator's output for the same arguments changes (invalidates preset caches).
SIMULATOR_VERSION = 1

FILL_FRACTION = 0.8  # auto apix: the largest state's diameter is at most this fraction of the box
SLICE_PAD = 2  # real-space zero padding of the volume before Fourier slicing
# Permissions a plain mkdir would give (mkdtemp's folder is owner-only); the umask is read once at import.
_UMASK = os.umask(0)
os.umask(_UMASK)
_DIR_MODE = 0o777 & ~_UMASK

SNR_DEFINITION = (
    "SNR = var(clean) / noise_sigma^2, var(clean) = variance over all pixels of all clean images "
    "(CTF-modulated, sign as stored) of the dataset; noise is white Gaussian with std noise_sigma"
)
SIGN_CONVENTION = (
    "image = -(CTF * projection) + noise when invert is true (CryoBench: the projection is negated; "
    "load with invert=True to get positive density), image = CTF * projection + noise otherwise; "
    "observed = projection shifted by -t, t = stored re-centring shift (docs/conventions.md)"
)


@dataclass
class State:
    """One ground-truth state: the heavy atoms of a structure in Å.

    ``coords (n, 3)`` Å [x, y, z] in the file's frame; ``atomic_numbers (n,)``. States with the same
    ``frame`` name share one origin (conformations of one complex: the motion stays visible); a state
    with ``frame=None`` is centred on its own centre of mass (distinct complexes). ``source`` says where
    the atoms came from (for meta.json). The optional per-atom ``atom_names``, ``residue_names``,
    ``residue_numbers``, ``insertion_codes`` and ``chain_ids`` are kept so the state can be written back
    as a structure file (:func:`write_state_structure`).
    """

    name: str
    coords: np.ndarray
    atomic_numbers: np.ndarray
    frame: str | None = None
    source: str = ""
    atom_names: np.ndarray | None = None
    residue_names: np.ndarray | None = None
    residue_numbers: np.ndarray | None = None
    insertion_codes: np.ndarray | None = None
    chain_ids: np.ndarray | None = None

    def __post_init__(self):
        self.coords = np.asarray(self.coords, dtype=np.float64)
        self.atomic_numbers = np.asarray(self.atomic_numbers, dtype=np.int64)
        n = len(self.coords)
        if self.coords.ndim != 2 or self.coords.shape[1] != 3 or n == 0:
            raise InputError(
                f"state '{self.name}': coords must be a non-empty (n, 3) array in Å, got shape "
                f"{self.coords.shape}; check the structure file ({self.source or 'no source'})"
            )
        if self.atomic_numbers.shape != (n,) or (self.atomic_numbers < 1).any():
            raise InputError(
                f"state '{self.name}': atomic_numbers must be {n} positive integers; check the "
                f"element columns of {self.source or 'the structure'}"
            )
        if not np.isfinite(self.coords).all():
            raise InputError(
                f"state '{self.name}': coordinates contain NaN/inf; fix {self.source or 'the input'}"
            )

    def subset(self, mask: np.ndarray, name: str, source: str | None = None) -> State:
        """The atoms selected by the boolean ``mask (n,)`` as a new state (same frame)."""
        per_atom = {f: getattr(self, f)[mask] for f in _PER_ATOM if getattr(self, f) is not None}
        return dataclasses.replace(
            self, name=name, source=self.source if source is None else source, **per_atom
        )

    def with_coords(self, coords: np.ndarray, name: str, source: str | None = None) -> State:
        """The same atoms at new ``coords (n, 3)`` Å (another conformation)."""
        return dataclasses.replace(
            self, coords=coords, name=name, source=self.source if source is None else source
        )


_PER_ATOM = (
    "coords",
    "atomic_numbers",
    "atom_names",
    "residue_names",
    "residue_numbers",
    "insertion_codes",
    "chain_ids",
)


# ----------------------------------------------------------------------------------------------------------
# Loading and writing atoms


def read_states(
    path: str | os.PathLike, name: str | None = None, frame: str | None = None, all_models: bool = False
) -> list[State]:
    """Heavy atoms of a PDB/mmCIF file (optionally gzipped) as states, one per model (first model only
    unless ``all_models``).

    Read with :func:`cryobench_lab.io.structures.read_structure`: hydrogens, waters and alternative
    conformations beyond the first are dropped, ligands are kept (they are part of the particle), and
    CHARMM-style files without element columns get their elements from the atom names. Names are
    ``name`` (default the file stem) plus ``_m{k}`` per model when ``all_models``.
    """
    path = Path(path)
    st = read_structure(path, keep_ligands=True)
    base = State(
        name=name or _file_stem(path),
        coords=st.atom_coords,
        atomic_numbers=st.atom_numbers,
        frame=frame,
        source=path.name,
        atom_names=st.atom_names,
        residue_names=st.atom_residue_names,
        residue_numbers=st.atom_residue_numbers,
        # antibody-style numbering (52, 52A, …) needs the insertion codes to keep residues apart
        insertion_codes=np.array(
            [res.seqid.icode for ch in st.gemmi_structure[0] for res in ch for _ in res]
        ),
        chain_ids=st.atom_chain_ids,
    )
    if not all_models:
        return [base]
    models = read_models(path, level="atom", keep_ligands=True)
    if any(m.shape != base.coords.shape for m in models):
        raise InputError(
            f"{path}: its models hold different atoms ({sorted({len(m) for m in models})}); "
            "every model of a conformational ensemble must have the same atoms"
        )
    return [
        base.with_coords(m, f"{base.name}_m{k + 1}", f"{path.name} model {k + 1}")
        for k, m in enumerate(models)
    ]


def _file_stem(path: Path) -> str:
    """``pdb7pbl.pdb.gz`` → ``pdb7pbl``."""
    name = path.name
    for suffix in (".gz", ".pdb", ".ent", ".cif", ".mmcif", ".pdbx"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def write_state_structure(folder: str | os.PathLike, stem: str, state: State, origin: np.ndarray) -> Path:
    """Write ``state`` with coordinates relative to ``origin (3,)`` Å, i.e. in the frame of the simulated
    volumes (box centre = 0), as ``folder/stem.pdb`` (``.cif`` when chain names or the atom count do not
    fit the PDB format). Returns the path.

    States built without residue information get one residue ``UNK`` per atom in chain A.
    """
    n = len(state.coords)
    xyz = state.coords - origin

    def column(values, default):
        return values if values is not None else default

    names = column(state.atom_names, np.array([gemmi.Element(int(z)).name for z in state.atomic_numbers]))
    res_names = column(state.residue_names, np.full(n, "UNK"))
    res_nums = column(state.residue_numbers, np.arange(1, n + 1))
    icodes = column(state.insertion_codes, np.full(n, " "))
    chains = column(state.chain_ids, np.full(n, "A"))
    model = gemmi.Model("1")
    chain = residue = None
    for i in range(n):
        if chain is None or chains[i] != chain.name:
            if chain is not None:
                chain.add_residue(residue)
                model.add_chain(chain)
            chain, residue = gemmi.Chain(str(chains[i])), None
        key = (str(res_names[i]), int(res_nums[i]), str(icodes[i]))
        if residue is None or (residue.name, residue.seqid.num, residue.seqid.icode) != key:
            if residue is not None:
                chain.add_residue(residue)
            residue = gemmi.Residue()
            residue.name, residue.seqid = key[0], gemmi.SeqId(key[1], key[2])
        atom = gemmi.Atom()
        atom.name, atom.element = str(names[i]), gemmi.Element(int(state.atomic_numbers[i]))
        atom.pos, atom.occ = gemmi.Position(*xyz[i]), 1.0
        residue.add_atom(atom)
    chain.add_residue(residue)
    model.add_chain(chain)
    st = gemmi.Structure()
    st.name = state.name
    st.add_model(model)
    st.setup_entities()
    if n < 100_000 and all(len(c.name) == 1 for c in st[0]):
        path = Path(folder) / f"{stem}.pdb"
        st.write_pdb(str(path))
    else:
        path = Path(folder) / f"{stem}.cif"
        st.make_mmcif_document().write_file(str(path))
    return path


# ----------------------------------------------------------------------------------------------------------
# Geometry and density


def frame_origins(states: Sequence[State]) -> np.ndarray:
    """Origin (Å, file frame) of every state → ``(S, 3)``.

    A state with ``frame=None`` gets its own electron-weighted centre of mass. States sharing a frame
    name get one common origin: the electron-weighted centre of mass of their atoms pooled over all of
    them, so conformational motion and assembly stay in a common frame instead of being re-centred.
    """
    origins = np.zeros((len(states), 3))
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(states):
        if s.frame is None:
            origins[i] = np.average(s.coords, axis=0, weights=s.atomic_numbers)
        else:
            groups.setdefault(s.frame, []).append(i)
    for members in groups.values():
        xyz = np.concatenate([states[i].coords for i in members])
        w = np.concatenate([states[i].atomic_numbers for i in members])
        origins[members] = np.average(xyz, axis=0, weights=w)
    return origins


def max_radius(states: Sequence[State], origins: np.ndarray) -> float:
    """Largest atom distance (Å) from its state's origin, over all states."""
    return float(max(np.linalg.norm(s.coords - o, axis=1).max() for s, o in zip(states, origins)))


def auto_apix(states: Sequence[State], box_size: int, origins: np.ndarray | None = None) -> float:
    """Pixel size (Å, rounded up to 0.01) at which every state's diameter ``2·r_max`` is at most
    ``FILL_FRACTION · box_size · apix`` (r_max: farthest heavy atom from the state's origin).

    The remaining 10 % of the box on each side holds the blur (≈ 2σ ≤ 1.5 px at the default σ) and the
    in-plane shifts of the default ``shift_range_px = D/16``, so projections are not clipped.
    """
    origins = frame_origins(states) if origins is None else origins
    r = max_radius(states, origins)
    return math.ceil(100.0 * 2.0 * r / (FILL_FRACTION * box_size) - 1e-9) / 100.0


def blur_sigma(apix: float, b_factor: float | None = None) -> float:
    """Gaussian blur σ (Å) of every atom: ``√(B/8π²)`` for a B-factor (Å²), else ``max(1 Å, 0.75·apix)``."""
    if b_factor is not None:
        if b_factor <= 0:
            raise InputError(
                f"b_factor={b_factor}: must be a positive B-factor in Å² (or None for the default)"
            )
        return math.sqrt(b_factor / (8.0 * math.pi**2))
    return band_limited_sigma(apix)


def state_gaussians(state: State, origin: np.ndarray, sigma: float, dtype=torch.float64):
    """The density of ``state`` as a Gaussian mixture relative to ``origin``: ``(centers (n, 3) Å,
    sigmas (n,) Å, amplitudes (n,) e/Å³ peak values)`` for physics/gaussians.py.

    Each Gaussian integrates to the atom's electron count Z, so the peak is ``Z / ((2π)^{3/2} σ³)``.
    """
    centers = torch.as_tensor(state.coords - origin, dtype=dtype)
    sigmas = torch.full((len(centers),), sigma, dtype=dtype)
    amplitudes = atom_amplitudes(torch.as_tensor(state.atomic_numbers, dtype=dtype), sigma)
    return centers, sigmas, amplitudes


def render_volume(state: State, origin: np.ndarray, box_size: int, apix: float, sigma: float) -> torch.Tensor:
    """Voxel-integrated density of ``state`` (e/Å³) on a ``(D, D, D)`` float32 grid centred on ``origin``.

    Rendered in float64 (the erf differences of far-away voxels lose digits in float32) then cast.
    """
    centers, sigmas, amplitudes = state_gaussians(state, origin, sigma)
    return voxelize_gaussians(centers, sigmas, amplitudes, box_size, apix).float()  # (D, D, D)


def slice_spectrum(vol: torch.Tensor, pad: int = SLICE_PAD) -> torch.Tensor:
    """Spectrum of ``vol (D, D, D)`` for Fourier slicing, with the gridding correction → ``(pD, pD, pD)``.

    Trilinear interpolation of the ``pad``-fold oversampled spectrum multiplies the (padded) volume by
    ``sinc²(x / (pad·D))`` along each axis (x in voxels from the centre); dividing by it first cancels
    that apodisation.
    """
    D = vol.shape[-1]
    x = (torch.arange(D, dtype=torch.float64) - D // 2) / (pad * D)
    w = torch.sinc(x) ** 2  # (D,)
    corrected = vol.double() / (w[:, None, None] * w[None, :, None] * w[None, None, :])
    return volume_spectrum(corrected, pad).to(torch.complex64)  # (pD, pD, pD)


def render_images(
    spectrum: torch.Tensor,
    rot: torch.Tensor,
    trans_px: torch.Tensor,
    ctf: torch.Tensor,
    apix: float,
    invert: bool,
) -> torch.Tensor:
    """Clean images ``±CTF ⊛ shift(P_R(V), −t)`` → ``(B, D, D)`` float32 in e/Å² (times the CTF).

    ``spectrum`` from :func:`slice_spectrum`; ``rot (B, 3, 3)``; ``trans_px (B, 2)`` the stored re-centring
    shifts (the image content is moved by ``−t``); ``ctf (B, 9)`` cryoDRGN parameters of these images.
    """
    D = int(ctf[0, 0])
    F = extract_slices(spectrum, rot, D)  # (B, D, D) spectrum of Σ_z V
    F = phase_shift_2d(F, -trans_px) * ctf_image(ctf, D)  # (B, D, D)
    img = ifft2_center(F).real * apix  # line integral: voxel sum × apix
    return -img if invert else img


# ----------------------------------------------------------------------------------------------------------
# The dataset


def _particle_counts(n_particles_per_state, n_states: int) -> np.ndarray:
    """Particles per state → ``(S,)`` int64, from one count for all states or one per state."""
    counts = np.asarray(n_particles_per_state, dtype=np.int64)
    if counts.ndim == 0:
        counts = np.full(n_states, int(counts))
    if counts.shape != (n_states,) or (counts < 1).any():
        raise InputError(
            f"n_particles_per_state={n_particles_per_state!r}: give one positive count, or one "
            f"per state ({n_states} states)"
        )
    return counts


def _seeds(seed: int) -> tuple[int, int]:
    """Independent seeds for (parameters, noise) derived from one user seed."""
    a, b = np.random.SeedSequence(int(seed)).spawn(2)
    return int(a.generate_state(1)[0]), int(b.generate_state(1)[0])


def _check_args(box_size, apix, snr, defocus_range, shift_range_px, batch_size):
    if not isinstance(box_size, (int, np.integer)) or box_size < 8 or box_size % 2:
        raise InputError(f"box_size={box_size!r}: must be an even integer ≥ 8 (px)")
    if apix is not None and not apix > 0:
        raise InputError(f"apix={apix!r}: must be a positive pixel size in Å (or None to choose it)")
    if snr is not None and not (snr > 0):
        raise InputError(f"snr={snr!r}: must be > 0 (or None / inf for noise-free images)")
    lo, hi = defocus_range
    if not 0 <= lo <= hi:
        raise InputError(f"defocus_range={defocus_range!r}: must be (low, high) Å with 0 ≤ low ≤ high")
    if shift_range_px < 0 or shift_range_px >= box_size / 2:
        raise InputError(f"shift_range_px={shift_range_px!r}: must be in [0, box_size/2)")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: must be ≥ 1")


def simulate_dataset(
    states: Sequence[State],
    out_dir: str | os.PathLike,
    box_size: int = 64,
    apix: float | None = None,
    n_particles_per_state: int | Sequence[int] = 1000,
    snr: float | None = 0.1,
    defocus_range: tuple[float, float] = (10000.0, 25000.0),
    astigmatism: float = 200.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    shift_range_px: float | None = None,
    seed: int = 0,
    invert: bool = True,
    b_factor: float | None = None,
    batch_size: int = 128,
    progress: bool = True,
    recipe: dict | None = None,
) -> Path:
    """Simulate a particle dataset from atomic ``states`` into the new folder ``out_dir``; returns it.

    Units: apix Å/px (None: :func:`auto_apix`), defocus Å, astigmatism Å (``defocus_v = defocus_u −
    astigmatism``), voltage kV, cs mm, shift_range_px px (None: ``box_size / 16``), b_factor Å² (None:
    σ = max(1 Å, 0.75·apix), see the module docstring). ``snr=None`` (or inf) writes noise-free images.
    ``recipe`` (e.g. a preset's) is stored in meta.json as is.

    Writes ``particles.mrcs``, ``particles.star`` (RELION 3.1, ``rlnClassNumber = label + 1``),
    ``poses.pkl``, ``ctf.pkl`` (cryoDRGN), ``labels.npy`` (int64, 0-based state index),
    ``gt_volumes/state_XXX.mrc`` (positive density, e/Å³, no CTF), ``gt_structures/state_XXX.pdb`` (the
    atoms in the volume frame; ``.cif`` if they do not fit the PDB format) and ``meta.json``. Everything is written into a hidden sibling folder
    that is renamed to ``out_dir`` at the end, so an interrupted run leaves no dataset behind.
    """
    t_start = time.time()
    states = list(states)
    if not states:
        raise InputError("simulate_dataset: no states given; pass at least one structure")
    names = [s.name for s in states]
    if len(set(names)) != len(names):
        raise InputError(f"simulate_dataset: state names must be unique, got {names}")
    shift_range_px = box_size / 16.0 if shift_range_px is None else float(shift_range_px)
    snr = None if snr is None or math.isinf(snr) else float(snr)
    _check_args(box_size, apix, snr, defocus_range, shift_range_px, batch_size)
    counts = _particle_counts(n_particles_per_state, len(states))
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(
            f"{out_dir}: output folder exists and is not empty; choose a new folder or delete it"
        )

    origins = frame_origins(states)
    apix = auto_apix(states, box_size, origins) if apix is None else float(apix)
    r_max = max_radius(states, origins)
    if 2 * r_max > box_size * apix:
        raise InputError(
            f"apix={apix}: the largest state (diameter {2 * r_max:.1f} Å) does not fit in the "
            f"{box_size}-px box ({box_size * apix:.1f} Å); use apix ≥ "
            f"{2 * r_max / (FILL_FRACTION * box_size):.2f} or leave apix unset"
        )
    sigma = blur_sigma(apix, b_factor)
    D = int(box_size)
    N = int(counts.sum())

    # --- random parameters (one generator, fixed draw order), then noise (another generator)
    param_seed, noise_seed = _seeds(seed)
    g = torch.Generator().manual_seed(param_seed)
    labels = np.repeat(np.arange(len(states)), counts)[torch.randperm(N, generator=g).numpy()]  # (N,)
    rot = random_rotations(N, generator=g)  # (N, 3, 3)
    trans = (torch.rand(N, 2, generator=g, dtype=torch.float64) * 2 - 1) * shift_range_px  # (N, 2) px
    u = torch.rand(N, 2, generator=g, dtype=torch.float64)
    dfu = defocus_range[0] + u[:, 0] * (defocus_range[1] - defocus_range[0])
    ctf = torch.zeros(N, 9, dtype=torch.float64)
    ctf[:, 0], ctf[:, 1], ctf[:, 2], ctf[:, 3] = D, apix, dfu, dfu - astigmatism
    ctf[:, 4], ctf[:, 5], ctf[:, 6], ctf[:, 7] = u[:, 1] * 180.0, voltage, cs, amplitude_contrast
    ctf = ctf.float()
    trans = trans.float()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        (tmp / "gt_volumes").mkdir()
        (tmp / "gt_structures").mkdir()
        n_steps = len(states) + sum(math.ceil(c / batch_size) for c in counts)
        n_steps += math.ceil(N / batch_size) if snr else 0
        bar = tqdm(
            total=n_steps, desc=f"simulate {out_dir.name}", unit="step", disable=not progress, leave=False
        )
        stack = mrcfile.new_mmap(tmp / "particles.mrcs", shape=(N, D, D), mrc_mode=2, overwrite=True)
        try:
            stack.set_image_stack()
            stack.voxel_size = apix
            data = stack.data  # (N, D, D) float32 memory map
            total, total_sq = 0.0, 0.0
            structures = []  # file names in gt_structures/
            for k, state in enumerate(states):
                bar.set_postfix_str(f"state {k + 1}/{len(states)}: volume")
                vol = render_volume(state, origins[k], D, apix, sigma)  # (D, D, D)
                write_mrc(tmp / "gt_volumes" / f"state_{k:03d}.mrc", vol.numpy(), apix)
                structures.append(
                    write_state_structure(tmp / "gt_structures", f"state_{k:03d}", state, origins[k]).name
                )
                spectrum = slice_spectrum(vol)
                bar.update(1)
                bar.set_postfix_str(f"state {k + 1}/{len(states)}: images")
                idx = np.flatnonzero(labels == k)
                for s in range(0, len(idx), batch_size):
                    b = idx[s : s + batch_size]
                    bt = torch.from_numpy(b)
                    img = render_images(spectrum, rot[bt], trans[bt], ctf[bt], apix, invert)  # (B, D, D)
                    img64 = img.double()
                    total += float(img64.sum())
                    total_sq += float(img64.square().sum())
                    data[b] = img.numpy()
                    bar.update(1)
                del spectrum  # up to (2D)³ complex: free it before the next state's
            n_pix = N * D * D
            signal_var = total_sq / n_pix - (total / n_pix) ** 2
            noise_sigma = math.sqrt(signal_var / snr) if snr else 0.0
            if snr:
                bar.set_postfix_str("noise")
                gn = torch.Generator().manual_seed(noise_seed)
                for s in range(0, N, batch_size):
                    chunk = torch.from_numpy(np.array(data[s : s + batch_size]))  # (B, D, D)
                    chunk += noise_sigma * torch.randn(chunk.shape, generator=gn)
                    data[s : s + batch_size] = chunk.numpy()
                    bar.update(1)
            stack.update_header_stats()
        finally:
            stack.close()
            bar.close()

        save_poses(tmp / "poses.pkl", rot, trans, D)
        save_ctf(tmp / "ctf.pkl", ctf)
        np.save(tmp / "labels.npy", labels.astype(np.int64))
        write_particle_star(
            tmp / "particles.star",
            [f"{i + 1}@particles.mrcs" for i in range(N)],
            rot.numpy(),
            trans.numpy(),
            ctf.numpy(),
            apix,
            D,
            labels,
        )
        meta = {
            "format": "cryobench_lab simulated particles",
            "package_version": __version__,
            "simulator_version": SIMULATOR_VERSION,
            "n_particles": N,
            "n_states": len(states),
            "box_size": D,
            "apix": apix,
            "snr": snr,
            "snr_definition": SNR_DEFINITION,
            "signal_variance": signal_var,
            "noise_sigma": noise_sigma,
            "invert": bool(invert),
            "sign_convention": SIGN_CONVENTION,
            "seed": int(seed),
            "seeds": {"parameters": param_seed, "noise": noise_seed},
            "density_model": {
                "gaussian_per": "heavy atom (hydrogens and waters dropped)",
                "amplitude": "atomic number Z (electrons): each Gaussian integrates to Z; volumes in e/Å^3",
                "sigma_A": sigma,
                "b_factor": b_factor if b_factor is not None else 8 * math.pi**2 * sigma**2,
                "sigma_rule": "sqrt(B/(8 pi^2)) from b_factor"
                if b_factor is not None
                else f"max({MIN_BLUR_SIGMA} Å, {BLUR_SIGMA_PER_APIX} * apix)",
                "volumes": "voxel-integrated Gaussians (physics.gaussians.voxelize_gaussians), no CTF",
                "images": f"Fourier slices of the ground-truth volume ({SLICE_PAD}x padding, trilinear, "
                "sinc^2 gridding correction) x apix, shift, CTF",
            },
            "poses": "uniform on SO(3) (cryoDRGN convention: a point mu lands at (R mu)_xy)",
            "shift_range_px": shift_range_px,
            "shift_distribution": "uniform in ±shift_range_px per axis; the stored t re-centres",
            "ctf": {
                "defocus_range_A": list(map(float, defocus_range)),
                "astigmatism_A": float(astigmatism),
                "defocus_angle": "uniform [0, 180) deg",
                "voltage_kV": float(voltage),
                "cs_mm": float(cs),
                "amplitude_contrast": float(amplitude_contrast),
                "phase_shift_deg": 0.0,
            },
            "auto_apix_rule": f"diameter of the largest state <= {FILL_FRACTION} * box_size * apix",
            "max_radius_A": r_max,
            "states": [
                {
                    "index": k,
                    "name": s.name,
                    "source": s.source,
                    "frame": s.frame,
                    "n_atoms": len(s.coords),
                    "n_electrons": int(s.atomic_numbers.sum()),
                    "n_particles": int(counts[k]),
                    "origin_A": origins[k].round(4).tolist(),
                    "radius_A": float(np.linalg.norm(s.coords - origins[k], axis=1).max()),
                    "volume": f"gt_volumes/state_{k:03d}.mrc",
                    "structure": f"gt_structures/{structures[k]}",
                }
                for k, s in enumerate(states)
            ],
            "state_names": names,
            "structure": str(out_dir / "gt_structures" / structures[0]),
            "files": {
                "particles": "particles.mrcs",
                "star": "particles.star",
                "poses": "poses.pkl",
                "ctf": "ctf.pkl",
                "labels": "labels.npy",
                "gt_volumes": "gt_volumes",
                "gt_structures": "gt_structures",
            },
            "recipe": recipe or {},
            "seconds": round(time.time() - t_start, 2),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, _DIR_MODE)  # mkdtemp makes it owner-only
        try:
            if out_dir.exists():
                out_dir.rmdir()  # empty, checked above
            os.rename(tmp, out_dir)
        except OSError as exc:
            raise InputError(
                f"{out_dir}: another process wrote this folder during the simulation ({exc}); "
                "use that dataset or delete the folder"
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
