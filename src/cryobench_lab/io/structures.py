"""Atomic models (PDB, mmCIF, gzipped or not) via gemmi, as numpy arrays.

``read_structure`` keeps one model and, by default, only polymer heavy atoms (hydrogens, waters and
ligands removed; first alternative conformation only). Besides the atoms it gives a per-residue view for
coarse-grained models (one Gaussian per residue, as cryoSPHERE): a representative atom per residue (CA for
amino acids, C1' for nucleotides; polymer residues with neither are left out of the view) and the
residue's electron count, defined here as the SUM OF ATOMIC NUMBERS OF ITS HEAVY ATOMS (hydrogens never
count, even when kept).

Files without an element column (CHARMM/MD output such as adk_closed.pdb) make gemmi guess elements from
2-letter atom names ('CA' → calcium, 'HG1' → mercury). In polymer residues, whose atoms can only be
H/C/N/O/S/P/Se, an element outside that set is re-derived from the atom name's first letter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np

from cryobench_lab.errors import InputError
from cryobench_lab.io.atomic import atomic_path

_POLYMER_ELEMENTS = {"H", "D", "C", "N", "O", "S", "P", "Se"}
_REPRESENTATIVE = ("CA", "C1'")  # amino acid, nucleotide


@dataclass
class Structure:
    """One model of an atomic structure as numpy arrays (coordinates in Å, float32).

    Atoms (n_atoms): ``atom_coords (n_atoms, 3)``, ``atom_elements`` (symbols), ``atom_numbers``
    (atomic numbers), ``atom_names``, ``atom_chain_ids``, ``atom_residue_numbers``, ``atom_residue_names``,
    ``atom_residue_index`` (row of the atom's residue in the residue view, -1 if not in it).
    Residues (n_residues, polymer residues with a representative atom): ``residue_coords (n_res, 3)``
    (CA or C1'), ``residue_electrons`` (sum of heavy-atom atomic numbers), ``residue_chain_ids``,
    ``residue_numbers``, ``residue_names``, ``residue_is_nucleotide``, ``residue_atom_index`` (row of the
    representative atom in the atom arrays).
    """

    atom_coords: np.ndarray
    atom_elements: np.ndarray
    atom_numbers: np.ndarray
    atom_names: np.ndarray
    atom_chain_ids: np.ndarray
    atom_residue_numbers: np.ndarray
    atom_residue_names: np.ndarray
    atom_residue_index: np.ndarray
    residue_coords: np.ndarray
    residue_electrons: np.ndarray
    residue_chain_ids: np.ndarray
    residue_numbers: np.ndarray
    residue_names: np.ndarray
    residue_is_nucleotide: np.ndarray
    residue_atom_index: np.ndarray
    source: str = ""
    # The filtered one-model gemmi structure the arrays were read from (same atom order); kept so that
    # write_structure can save moved coordinates with every other record (B-factors, het flags) intact.
    gemmi_structure: gemmi.Structure | None = field(default=None, repr=False, compare=False)

    @property
    def n_atoms(self) -> int:
        return len(self.atom_coords)

    @property
    def n_residues(self) -> int:
        return len(self.residue_coords)


def _load(path: Path) -> gemmi.Structure:
    if not path.is_file():
        raise InputError(f"{path}: file not found; check the path")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable PDB/mmCIF file ({exc})") from exc
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"{path}: no atoms found; is this a PDB or mmCIF file?")
    st.setup_entities()
    st.remove_alternative_conformations()
    return st


def _fix_polymer_elements(model: gemmi.Model) -> None:
    """Re-derive implausible elements of polymer atoms from their names (see module docstring)."""
    for chain in model:
        for res in chain:
            if res.entity_type != gemmi.EntityType.Polymer:
                continue
            for atom in res:
                if atom.element.name in _POLYMER_ELEMENTS:
                    continue
                name = atom.name.lstrip("0123456789").upper()
                if res.name == "MSE" and name.startswith("SE"):
                    atom.element = gemmi.Element("Se")
                elif name[:1] in {"H", "C", "N", "O", "S", "P", "D"}:
                    atom.element = gemmi.Element(name[:1])


def _filter(model: gemmi.Model, hydrogens: bool, waters: bool, ligands: bool) -> None:
    """Remove unwanted atoms/residues from ``model`` in place."""
    keep_types = {gemmi.EntityType.Polymer}
    if waters:
        keep_types.add(gemmi.EntityType.Water)
    if ligands:
        keep_types |= {gemmi.EntityType.NonPolymer, gemmi.EntityType.Branched, gemmi.EntityType.Unknown}
    for chain in model:
        for i in reversed(range(len(chain))):
            if chain[i].entity_type not in keep_types:
                del chain[i]
    if not hydrogens:
        model.remove_hydrogens()
    _drop_empty(model)


def _drop_empty(model: gemmi.Model) -> None:
    """Delete residues without atoms and chains without residues."""
    for i in reversed(range(len(model))):
        chain = model[i]
        for j in reversed(range(len(chain))):
            if len(chain[j]) == 0:
                del chain[j]
        if len(chain) == 0:
            del model[i]


def _arrays(model: gemmi.Model, path: Path) -> dict:
    """Atom and residue arrays of a filtered model."""
    coords, elements, numbers, names, chains, resnums, resnames, res_index = [], [], [], [], [], [], [], []
    r_coords, r_electrons, r_chains, r_nums, r_names, r_nucl, r_atom = [], [], [], [], [], [], []
    for chain in model:
        for res in chain:
            rep = None
            if res.entity_type == gemmi.EntityType.Polymer:
                for kind, rep_name in enumerate(_REPRESENTATIVE):
                    found = [k for k, a in enumerate(res) if a.name == rep_name and a.element.name == "C"]
                    if found:
                        rep = (kind, found[0])
                        break
            row = len(r_coords) if rep is not None else -1
            first_atom = len(coords)
            electrons = 0
            for atom in res:
                coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
                elements.append(atom.element.name)
                numbers.append(atom.element.atomic_number)
                names.append(atom.name)
                chains.append(chain.name)
                resnums.append(res.seqid.num)
                resnames.append(res.name)
                res_index.append(row)
                if not atom.is_hydrogen():
                    electrons += atom.element.atomic_number
            if rep is not None:
                kind, k = rep
                r_coords.append(coords[first_atom + k])
                r_electrons.append(electrons)
                r_chains.append(chain.name)
                r_nums.append(res.seqid.num)
                r_names.append(res.name)
                r_nucl.append(kind == 1)
                r_atom.append(first_atom + k)
    if not coords:
        raise InputError(f"{path}: no atoms left after removing hydrogens, waters and ligands; pass "
                         "keep_ligands=True / keep_waters=True if that is what the file holds")
    return {
        "atom_coords": np.asarray(coords, dtype=np.float32).reshape(-1, 3),
        "atom_elements": np.asarray(elements, dtype=str),
        "atom_numbers": np.asarray(numbers, dtype=np.int64),
        "atom_names": np.asarray(names, dtype=str),
        "atom_chain_ids": np.asarray(chains, dtype=str),
        "atom_residue_numbers": np.asarray(resnums, dtype=np.int64),
        "atom_residue_names": np.asarray(resnames, dtype=str),
        "atom_residue_index": np.asarray(res_index, dtype=np.int64),
        "residue_coords": np.asarray(r_coords, dtype=np.float32).reshape(-1, 3),
        "residue_electrons": np.asarray(r_electrons, dtype=np.int64),
        "residue_chain_ids": np.asarray(r_chains, dtype=str),
        "residue_numbers": np.asarray(r_nums, dtype=np.int64),
        "residue_names": np.asarray(r_names, dtype=str),
        "residue_is_nucleotide": np.asarray(r_nucl, dtype=bool),
        "residue_atom_index": np.asarray(r_atom, dtype=np.int64),
    }


def _prepare(path: Path, hydrogens: bool, waters: bool, ligands: bool) -> gemmi.Structure:
    st = _load(path)
    for model in st:
        _fix_polymer_elements(model)
        _filter(model, hydrogens, waters, ligands)
    return st


def read_structure(
    path: str | os.PathLike,
    model: int = 0,
    keep_hydrogens: bool = False,
    keep_waters: bool = False,
    keep_ligands: bool = False,
) -> Structure:
    """Read model ``model`` (0-based) of a PDB/mmCIF file (``.gz`` too) as a :class:`Structure`."""
    path = Path(path)
    st = _prepare(path, keep_hydrogens, keep_waters, keep_ligands)
    if not 0 <= model < len(st):
        raise InputError(f"{path}: has {len(st)} model(s), model {model} (0-based) does not exist")
    one = st.clone()
    for i in reversed(range(len(one))):
        if i != model:
            del one[i]
    return Structure(**_arrays(one[0], path), source=str(path), gemmi_structure=one)


def read_models(
    path: str | os.PathLike,
    level: str = "residue",
    keep_hydrogens: bool = False,
    keep_waters: bool = False,
    keep_ligands: bool = False,
) -> list[np.ndarray]:
    """Coordinates (Å, float32) of every model of a multi-model file, in file order.

    ``level='residue'``: representative atoms ``(n_residues, 3)`` per model; ``level='atom'``: all kept
    atoms ``(n_atoms, 3)``. Filtering as in :func:`read_structure`.
    """
    if level not in ("residue", "atom"):
        raise ValueError(f"read_models: level must be 'residue' or 'atom', got {level!r}")
    path = Path(path)
    st = _prepare(path, keep_hydrogens, keep_waters, keep_ligands)
    key = "residue_coords" if level == "residue" else "atom_coords"
    return [_arrays(model, path)[key] for model in st]


def write_structure(path: str | os.PathLike, structure: Structure, coords) -> None:
    """Save ``structure`` with new coordinates (Å), as mmCIF for ``.cif``/``.mmcif`` else PDB, atomically.

    ``coords`` is ``(n_atoms, 3)`` to move every atom, or ``(n_residues, 3)`` to write the representative
    atoms only (a CA/C1' trace, e.g. a coarse-grained model's output). Atom count takes precedence when
    both counts are equal.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if structure.gemmi_structure is None:
        raise ValueError("write_structure needs a Structure returned by read_structure")
    st = structure.gemmi_structure.clone()
    if coords.shape == (structure.n_atoms, 3):
        keep = None
    elif coords.shape == (structure.n_residues, 3):
        keep = set(structure.residue_atom_index.tolist())
    else:
        raise ValueError(f"write_structure: coords must be ({structure.n_atoms}, 3) atoms or "
                         f"({structure.n_residues}, 3) residues, got {coords.shape}")
    atom_row = 0  # first row of the current residue in the atom arrays (gemmi iteration order)
    out_row = 0  # next row of coords
    for chain in st[0]:
        for res in chain:
            size = len(res)
            if keep is not None:
                for k in reversed(range(size)):  # backwards: a deletion does not move unvisited atoms
                    if atom_row + k not in keep:
                        del res[k]
            for atom in res:
                atom.pos = gemmi.Position(*coords[out_row])
                out_row += 1
            atom_row += size
    _drop_empty(st[0])
    suffix = Path(path).suffix.lower()
    with atomic_path(path) as tmp:
        if suffix in (".cif", ".mmcif"):
            st.setup_entities()
            st.make_mmcif_document().write_file(str(tmp))
        else:
            st.write_pdb(str(tmp))


def write_models(path: str | os.PathLike, structure: gemmi.Structure, coords: np.ndarray, bfactors: np.ndarray) -> None:
    """``structure`` (one model) with its atoms at ``coords (M, n_atoms, 3)`` Å, as an M-model PDB, and
    ``bfactors (n_atoms,)`` in every model's B-factor column (e.g. the segment of each atom's residue).
    Atoms in the structure's order; written atomically."""
    out = gemmi.Structure()
    out.cell, out.spacegroup_hm = structure.cell, structure.spacegroup_hm
    for m, xyz in enumerate(coords):
        model = structure[0].clone()
        model.num = m + 1
        for row, atom in enumerate(a for chain in model for res in chain for a in res):
            atom.pos = gemmi.Position(*map(float, xyz[row]))
            atom.b_iso = float(bfactors[row])
        out.add_model(model)
    out.setup_entities()
    with atomic_path(path) as tmp:
        out.write_pdb(str(tmp))
