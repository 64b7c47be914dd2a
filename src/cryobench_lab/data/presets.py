"""Built-in simulated datasets: recipes, a cache, and the AdK trajectory reader.

The Hydra and CryoBench benchmark datasets use PDB entries that are not available offline; these presets
build stand-ins of the same kinds from the structures bundled in ``cryobench_lab/structures`` (see
ATTRIBUTION.md there):

``tomotwin3`` (compositional)
    Three distinct complexes, each centred on itself: 7PBL (RuvAB motor on a Holliday junction,
    15.9 k heavy atoms), 7CTH (dengue E-protein raft with scFv, 16.7 k) and 3HSY (GluA2 N-terminal
    domain dimer, 6.0 k). ``structures=[...]`` replaces them with the user's PDB/mmCIF files.
``adk`` (conformational)
    ``n_states`` frames evenly spaced over the 98-frame DIMS closed→open transition of adenylate kinase,
    all atoms of each frame (heavy atoms; elements from adk_closed.pdb, same atom order), in one common
    frame so the domain motion is not re-centred away. ``structures=[...]``: one multi-model file (its
    models are the frames) or several files (one conformation each, already superposed).
``assembly`` (compositional, like Ribosembly)
    Progressively assembled subsets of 7PBL in the full complex's frame, one chain per step: RuvB
    subunits A–E one by one, the Holliday-junction DNA strand by strand (U, V), the RuvA fragment (G),
    and last the subunit F that closes the ring. Every chain enters at its own step, so every chain has
    its own presence pattern and a part discovery can in principle find each one (chains that appear
    together and do not move are indistinguishable from the data). U, V and G add only ~300 heavy atoms
    each: small compositional differences, as in Ribosembly. The last step adds a whole subunit, so that
    even the state nearest the full complex lacks a chain large enough to be seen. With
    ``structures=[file]`` and no ``chain_sets``, the states are ``n_states`` cumulative prefixes of the
    file's chain list.
``ribosplike`` (compositional + conformational, like Hydra's ribosplike)
    Two complexes that each move: AdK (``n_frames`` frames of the closed→open transition) and 3HSY
    with a rigid-body hinge of chain B opening the A–B interface by ``hinge_angles`` degrees (axis on the
    interface's edge, perpendicular to the line joining the two chains' centres; see
    :func:`hinge_states`). Each complex has its own
    frame. ``structures=[...]``: each file is one complex; a multi-model file contributes ``n_frames``
    of its models, a single model one rigid state.

Every recipe key can be overridden (``box_size``, ``n_particles`` per state, ``snr``, ``apix``, ``seed``,
``structures``, the preset-specific keys below, and the simulation keys of :data:`DEFAULTS`).
:func:`ensure_dataset` simulates a recipe once into a cache folder named by a hash of the recipe, the
input files' contents and the simulator version, and reuses it afterwards.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from cryobench_lab import __version__
from cryobench_lab.data.simulate import SIMULATOR_VERSION, State, read_states, simulate_dataset
from cryobench_lab.errors import InputError
from cryobench_lab.io.structures import read_structure

STRUCTURES_DIR = Path(__file__).resolve().parents[1] / "structures"
CACHE_ENV = "CRYOBENCH_LAB_CACHE"

# Simulation parameters every preset accepts (simulate_dataset's keywords; n_particles is per state).
DEFAULTS = {
    "box_size": 64,
    "apix": None,
    "n_particles": 1000,
    "snr": 0.1,
    "seed": 0,
    "defocus_range": [10000.0, 25000.0],
    "astigmatism": 200.0,
    "voltage": 300.0,
    "cs": 2.7,
    "amplitude_contrast": 0.1,
    "shift_range_px": None,
    "invert": True,
    "b_factor": None,
}

_ADK = {"trajectory": "adk/adk_dims.dcd.gz", "topology": "adk/adk_closed.pdb.gz"}

PRESETS = {
    "tomotwin3": {
        "description": "3 distinct complexes (7PBL, 7CTH, 3HSY), compositional",
        "structures": ["pdb7pbl.pdb.gz", "mmcif_7cth.cif.gz", "pdb3hsy.pdb.gz"],
        "n_particles": 1000,
    },
    "adk": {
        "description": "adenylate kinase closed→open transition, all-atom frames, conformational",
        **_ADK,
        "structures": None,
        "n_states": 10,
        "n_particles": 300,
    },
    "assembly": {
        "description": "progressive assembly of 7PBL (RuvB ring, DNA, RuvA), one chain per step, compositional",
        "structures": ["pdb7pbl.pdb.gz"],
        "chain_sets": [list("ABCDEUVGF")[:k] for k in range(1, 10)],
        "n_states": 9,
        "n_particles": 350,
    },
    "ribosplike": {
        "description": "AdK closed→open frames + 3HSY chain-B hinge, compositional + conformational",
        **_ADK,
        "structures": None,
        "n_frames": 5,
        "hinge_structure": "pdb3hsy.pdb.gz",
        "hinge_chains": ["B"],
        "hinge_angles": [0.0, 5.0, 10.0, 15.0, 20.0],
        "n_particles": 300,
    },
}


# ----------------------------------------------------------------------------------------------------------
# Recipes


def resolve_recipe(name: str, overrides: dict | None = None) -> dict:
    """The full recipe of preset ``name`` with ``overrides`` applied (``None`` values are ignored).

    Structure paths are resolved (user files to absolute paths, bundled names to the package folder).
    When the user replaces ``structures``, recipe keys that describe the bundled inputs (chain sets,
    the AdK trajectory) are dropped unless also given.
    """
    if name not in PRESETS:
        raise InputError(f"preset '{name}' is unknown; choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    recipe = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(PRESETS[name])}
    unknown = sorted(set(overrides) - set(recipe) - {"description"})
    if unknown:
        raise InputError(
            f"preset '{name}': unknown override(s) {unknown}; valid keys are "
            f"{sorted(k for k in recipe if k != 'description')}"
        )
    if "structures" in overrides:
        files = overrides["structures"]
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not files:
            raise InputError(
                f"preset '{name}': structures=[] is empty; pass PDB/mmCIF files or leave it unset"
            )
        overrides["structures"] = files
        for key in ("chain_sets", "trajectory", "topology", "hinge_structure"):
            if key in recipe and key not in overrides:
                recipe[key] = None
    recipe.update(overrides)
    if recipe.get("structures"):
        recipe["structures"] = [str(_resolve_file(p, "structures")) for p in recipe["structures"]]
    for key in ("trajectory", "topology", "hinge_structure"):
        if recipe.get(key):
            recipe[key] = str(_resolve_file(recipe[key], key))
    recipe["defocus_range"] = [float(x) for x in recipe["defocus_range"]]
    return recipe


def _resolve_file(p, what: str) -> Path:
    """A user path (absolute, or relative to the working folder) or the name of a bundled structure."""
    path = Path(p).expanduser()
    if path.is_file():
        return path.resolve()
    if (STRUCTURES_DIR / str(p)).is_file():
        return STRUCTURES_DIR / str(p)
    raise InputError(
        f"{what}: {p} not found (neither a file nor a bundled structure in {STRUCTURES_DIR}); check the path"
    )


def _int(recipe: dict, key: str, lo: int = 1) -> int:
    value = recipe[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InputError(f"{key}={value!r}: must be an integer ≥ {lo}")
    return int(value)


def build_preset(name: str, **overrides) -> tuple[list[State], list[str]]:
    """The states of preset ``name`` (with ``overrides``) and their names."""
    recipe = resolve_recipe(name, overrides)
    states = _BUILDERS[name](recipe)
    return states, [s.name for s in states]


def _spaced(n_available: int, n: int, what: str) -> np.ndarray:
    """``n`` indices evenly spaced over ``0 … n_available − 1`` (first and last included)."""
    if n > n_available:
        raise InputError(f"{what}={n}: only {n_available} frames are available; choose at most {n_available}")
    return np.unique(np.round(np.linspace(0, n_available - 1, n)).astype(int)) if n > 1 else np.array([0])


def _trajectory_states(recipe: dict, n: int, frame: str, what: str) -> list[State]:
    """``n`` evenly spaced frames of the recipe's trajectory (DCD + topology PDB with the same atom order),
    heavy atoms without waters, in one common frame."""
    top_path = Path(recipe["topology"])
    full = read_structure(top_path, keep_hydrogens=True, keep_waters=True, keep_ligands=True)
    traj = read_dcd(recipe["trajectory"])  # (F, A, 3)
    if traj.shape[1] != full.n_atoms:
        raise InputError(
            f"{recipe['trajectory']}: {traj.shape[1]} atoms per frame but the topology {top_path} "
            f"has {full.n_atoms}; they must describe the same system in the same atom order"
        )
    top = read_states(top_path, frame=frame)[0]
    # rows of the kept (heavy, non-water) atoms among all atoms, matched by chain/residue/atom name
    keys = list(zip(full.atom_chain_ids, full.atom_residue_numbers, full.atom_residue_names, full.atom_names))
    row_of = {key: i for i, key in enumerate(keys)}
    if len(row_of) != len(keys):
        raise InputError(
            f"{top_path}: atoms are not unique by chain, residue number and atom name, so they "
            "cannot be matched to the trajectory; give every residue a unique number"
        )
    keep = np.array(
        [row_of[key] for key in zip(top.chain_ids, top.residue_numbers, top.residue_names, top.atom_names)]
    )
    stem = top_path.name.split("_")[0].split(".")[0]
    return [
        top.with_coords(
            traj[f][keep],
            f"{stem}_f{f:03d}",
            f"{Path(recipe['trajectory']).name} frame {f} (atoms of {top_path.name})",
        )
        for f in _spaced(len(traj), n, what)
    ]


def _model_states(path: str, n: int, frame: str, what: str) -> list[State]:
    """``n`` evenly spaced models of a multi-model file (all of one if it has a single model)."""
    models = read_states(path, frame=frame, all_models=True)
    if len(models) == 1:
        return [read_states(path, frame=frame)[0]]
    return [models[i] for i in _spaced(len(models), n, what)]


def _build_tomotwin3(recipe: dict) -> list[State]:
    return [read_states(p)[0] for p in recipe["structures"]]


def _build_adk(recipe: dict) -> list[State]:
    n = _int(recipe, "n_states")
    if recipe.get("trajectory"):
        return _trajectory_states(recipe, n, "conformations", "n_states")
    files = recipe["structures"]
    if len(files) == 1:
        return _model_states(files[0], n, "conformations", "n_states")
    return [read_states(p, frame="conformations")[0] for p in files]


def _build_assembly(recipe: dict) -> list[State]:
    if len(recipe["structures"]) != 1:
        raise InputError(
            f"preset 'assembly': structures must be ONE multi-chain file, got "
            f"{len(recipe['structures'])}; use 'tomotwin3' for several complexes"
        )
    full = read_states(recipe["structures"][0], frame="assembly")[0]
    chains = list(dict.fromkeys(full.chain_ids.tolist()))  # file order
    chain_sets = recipe.get("chain_sets")
    if not chain_sets:
        n = min(_int(recipe, "n_states"), len(chains))
        chain_sets = [chains[: math.ceil(k * len(chains) / n)] for k in range(1, n + 1)]
    states = []
    for subset in chain_sets:
        missing = sorted(set(subset) - set(chains))
        if missing or not subset:
            raise InputError(
                f"chain_sets: chains {missing or subset} not in {recipe['structures'][0]} (chains "
                f"{''.join(chains)}); list chain IDs of that file"
            )
        tag = "".join(subset)
        states.append(
            full.subset(np.isin(full.chain_ids, subset), f"{full.name}_{tag}", f"{full.source} chains {tag}")
        )
    return states


def _build_ribosplike(recipe: dict) -> list[State]:
    n = _int(recipe, "n_frames")
    if recipe.get("structures"):
        states = []
        for k, p in enumerate(recipe["structures"]):
            states += _model_states(p, n, f"complex{k}", "n_frames")
        return states
    states = _trajectory_states(recipe, n, "adk", "n_frames")
    base = read_states(recipe["hinge_structure"], frame="hinge")[0]
    return states + hinge_states(base, recipe["hinge_chains"], recipe["hinge_angles"])


def hinge_states(state: State, moving_chains, angles_deg) -> list[State]:
    """Rigid-body hinge: ``moving_chains`` of ``state`` rotated by each angle (degrees) → one state each.

    Axis: the complex's second principal axis made perpendicular to ``d``, the line from the fixed to the
    moving centre of mass. Pivot: on the edge of the interface (moving atoms within 6 Å of the fixed
    ones), so that positive angles open the interface like a hinge without pushing atoms into the fixed
    part. Atoms keep their order.
    """
    moving = np.isin(state.chain_ids, list(moving_chains))
    if not moving.any() or moving.all():
        raise InputError(
            f"hinge_chains={list(moving_chains)}: must name some but not all chains of "
            f"{state.source} (chains {''.join(dict.fromkeys(state.chain_ids.tolist()))})"
        )
    xyz, w = state.coords, state.atomic_numbers
    d = np.average(xyz[moving], 0, w[moving]) - np.average(xyz[~moving], 0, w[~moving])
    d /= np.linalg.norm(d)
    # (n_moving, n_fixed) distances in blocks: a 6 Å contact test without an (n, n) matrix
    fixed = xyz[~moving]
    near = np.zeros(moving.sum(), bool)
    for s in range(0, len(near), 2048):
        block = xyz[moving][s : s + 2048]
        near[s : s + 2048] = (((block[:, None, :] - fixed[None, :, :]) ** 2).sum(-1) < 36.0).any(1)
    if not near.any():
        raise InputError(
            f"hinge_chains={list(moving_chains)}: they do not touch the rest of {state.source} "
            "(no atoms within 6 Å), so there is no hinge; pick contacting chains"
        )
    _, _, vt = np.linalg.svd(xyz - xyz.mean(0), full_matrices=False)
    axis = max((v - (v @ d) * d for v in vt[1:]), key=np.linalg.norm)  # vt[2] if vt[1] is along d
    axis /= np.linalg.norm(axis)
    # Pivot on the interface's edge along e = axis × d: a positive rotation then moves every interface
    # atom (at −s·e from the pivot) along +d, away from the fixed part, so the interface opens instead
    # of half of it being pushed into the fixed chains.
    e = np.cross(axis, d)
    contact = xyz[moving][near]  # (m, 3)
    center = contact.mean(0)
    pivot = center + ((contact @ e).max() - center @ e) * e
    tag = "".join(moving_chains)
    states = []
    for angle in angles_deg:
        R = _axis_angle(axis, math.radians(float(angle)))
        coords = xyz.copy()
        coords[moving] = (xyz[moving] - pivot) @ R.T + pivot
        states.append(
            state.with_coords(
                coords,
                f"{state.name}_hinge{tag}_{float(angle):g}deg",
                f"{state.source}, chains {tag} rotated {float(angle):g}° about the interface",
            )
        )
    return states


def _axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` for a unit ``axis`` and an ``angle`` in radians (Rodrigues)."""
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


_BUILDERS = {
    "tomotwin3": _build_tomotwin3,
    "adk": _build_adk,
    "assembly": _build_assembly,
    "ribosplike": _build_ribosplike,
}


# ----------------------------------------------------------------------------------------------------------
# DCD trajectories


def read_dcd(path: str | os.PathLike) -> np.ndarray:
    """Coordinates of a CHARMM/NAMD DCD trajectory (optionally gzipped) → ``(n_frames, n_atoms, 3)``
    float32 Å.

    A DCD file is a sequence of Fortran unformatted records, each framed by its byte length as int32:
    a header ``'CORD'`` + 20 int32 control words (ICNTRL; [8] = number of fixed atoms, [10] = 1 if each
    frame carries a unit cell, [11] = 1 for a 4th dimension), a title record, a record holding the
    atom count, then per frame an optional unit-cell record (6 float64) and three records of float32
    x, y and z. Byte order is detected from the first length (84). The frame count is taken from the
    file size (the header's count is often stale). Fixed-atom and 4D files are not supported.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the DCD trajectory ({exc}); check the path") from exc
    end = "<" if raw[:4] == struct.pack("<i", 84) else ">"
    if raw[:4] != struct.pack(end + "i", 84) or raw[4:8] != b"CORD":
        raise InputError(f"{path}: not a CHARMM/NAMD DCD file (no 'CORD' header); convert it to DCD")
    icntrl = np.frombuffer(raw, dtype=end + "i4", count=20, offset=8)
    if icntrl[8] != 0 or icntrl[11] != 0:
        raise InputError(
            f"{path}: DCD with fixed atoms or 4D coordinates is not supported; write all atoms "
            "as free 3D coordinates"
        )
    pos = 4 + 84 + 4
    (title_len,) = struct.unpack_from(end + "i", raw, pos)
    pos += 4 + title_len + 4
    (natom,) = struct.unpack_from(end + "i", raw, pos + 4)
    pos += 4 + 4 + 4
    cell = 4 + 48 + 4 if icntrl[10] == 1 else 0
    frame_bytes = cell + 3 * (4 + 4 * natom + 4)
    n_frames = (len(raw) - pos) // frame_bytes
    if natom < 1 or n_frames < 1:
        raise InputError(
            f"{path}: DCD holds {n_frames} frames of {natom} atoms; the file is empty or damaged"
        )
    out = np.empty((n_frames, natom, 3), dtype=np.float32)
    for f in range(n_frames):
        p = pos + f * frame_bytes + cell
        for axis in range(3):
            (nbytes,) = struct.unpack_from(end + "i", raw, p)
            if nbytes != 4 * natom:
                raise InputError(
                    f"{path}: frame {f} record has {nbytes} bytes, expected {4 * natom}; the DCD is damaged"
                )
            out[f, :, axis] = np.frombuffer(raw, dtype=end + "f4", count=natom, offset=p + 4)
            p += 4 + 4 * natom + 4
    return out


# ----------------------------------------------------------------------------------------------------------
# Simulation and cache


def _sim_kwargs(recipe: dict) -> dict:
    """simulate_dataset keywords from a recipe."""
    kw = {k: recipe[k] for k in DEFAULTS if k != "n_particles"}
    kw["n_particles_per_state"] = recipe["n_particles"]
    kw["defocus_range"] = tuple(recipe["defocus_range"])
    return kw


def simulate_preset(
    name: str, out_dir: str | os.PathLike, overrides: dict | None = None, progress: bool = True
) -> Path:
    """Simulate preset ``name`` (with ``overrides``) into the new folder ``out_dir`` → its path."""
    recipe = resolve_recipe(name, overrides)
    states = _BUILDERS[name](recipe)
    return simulate_dataset(
        states, out_dir, **_sim_kwargs(recipe), progress=progress, recipe={"preset": name, **recipe}
    )


def default_cache_dir() -> Path:
    """``$CRYOBENCH_LAB_CACHE``, else ``~/.cache/cryobench_lab``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cryobench_lab").expanduser()


def recipe_key(name: str, recipe: dict) -> str:
    """Hash (hex) of a resolved recipe, the contents of its input files, and the simulator version."""
    inputs = {}
    for key in ("structures", "trajectory", "topology", "hinge_structure"):
        paths = recipe.get(key) or []
        for p in [paths] if isinstance(paths, str) else paths:
            inputs[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    # bundled files are named relative to the package so a moved installation keeps its cache
    recipe = json.loads(json.dumps(recipe).replace(str(STRUCTURES_DIR), "<bundled>"))
    inputs = {k.replace(str(STRUCTURES_DIR), "<bundled>"): v for k, v in inputs.items()}
    blob = json.dumps(
        {
            "preset": name,
            "recipe": recipe,
            "inputs": inputs,
            "simulator": SIMULATOR_VERSION,
            "version": __version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def ensure_dataset(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    overrides: dict | None = None,
    progress: bool = True,
) -> Path:
    """Folder of preset ``name`` with ``overrides``, simulated on first use and cached afterwards.

    The folder is ``<cache_dir>/<name>-<hash>`` (cache_dir default: :func:`default_cache_dir`), the hash
    covering the recipe, the input files' contents and the simulator version. A folder exists only
    when complete (the simulator writes elsewhere and renames at the end).
    """
    recipe = resolve_recipe(name, overrides)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / f"{name}-{recipe_key(name, recipe)[:12]}"
    if (folder / "meta.json").is_file():
        print(f"Using cached dataset '{name}' from {folder}", flush=True)
        return folder
    print(f"Simulating dataset '{name}' into {folder} (first use; cached afterwards)", flush=True)
    states = _BUILDERS[name](recipe)
    try:
        return simulate_dataset(
            states, folder, **_sim_kwargs(recipe), progress=progress, recipe={"preset": name, **recipe}
        )
    except InputError:
        if (folder / "meta.json").is_file():  # another process finished the same recipe first
            return folder
        raise
