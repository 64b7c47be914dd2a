"""Ground-truth volume files: which state each one is, and whether it lies on the particles' grid.

Pairing: a folder's ``*.mrc`` files are states in the order of the number in their names (``vol_2`` before
``vol_10``), never in name order. Names must differ in exactly one number, and those numbers must be
consecutive (from any start, e.g. 0 or 1); anything else (two patterns, zero padding as the only
difference, a missing number) is ambiguous and refused.

Grid: a volume is scored at the training box after Fourier cropping, which is right only when it covers
the particles' field of view (``box · voxel size`` = ``D0 · apix`` of the stack). The header's voxel size
decides; a header without one (0, or the placeholder 1 Å when the particles are not at 1 Å) is accepted
only on the particles' own box, or when the layout states that the volumes cover the particles' field of
view (CryoBench's ``vols/<D>_org``).
"""

from __future__ import annotations

import re
from pathlib import Path

from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import read_header

#: Relative tolerance on field-of-view and voxel-size agreement (CTF pickles store apix as float32).
GRID_RTOL = 2e-3
#: At most this many volume headers are read (evenly spaced): Spike-MD has one volume per image.
MAX_HEADERS = 256


def order_by_state_number(files: list[Path], where: str) -> list[Path]:
    """``files`` sorted by the one number that differs between their names (module docstring).

    ``where`` names the folder or setting in error messages.
    """
    if len(files) <= 1:
        return list(files)
    fix = "name them <prefix><state number>.mrc, e.g. vol_000.mrc … vol_{:03d}.mrc".format(len(files) - 1)
    parts = [re.split(r"(\d+)", f.name) for f in files]  # text, number, text, number, …, text
    patterns = {tuple(p[0::2]) for p in parts}
    if len(patterns) > 1:
        a, b = sorted(patterns)[:2]
        raise InputError(f"{where}: volume names follow different patterns ({'#'.join(a)}, {'#'.join(b)}), so "
                         f"their states are ambiguous; {fix}")
    numbers = [[int(x) for x in p[1::2]] for p in parts]  # (S, numbers per name)
    varying = [j for j in range(len(numbers[0])) if len({row[j] for row in numbers}) > 1]
    if not varying:
        raise InputError(f"{where}: volume names {files[0].name} and {files[1].name} differ only in zero padding "
                         f"(or in no number), so their states are ambiguous; {fix}")
    if len(varying) > 1:
        raise InputError(f"{where}: several numbers differ between volume names ({files[0].name}, "
                         f"{files[1].name}), so their states are ambiguous; {fix}")
    state = {f: row[varying[0]] for f, row in zip(files, numbers)}
    ordered = sorted(files, key=state.get)
    for prev, f in zip(ordered, ordered[1:]):
        if state[f] == state[prev]:
            raise InputError(f"{where}: {prev.name} and {f.name} carry the same number ({state[f]}) and differ "
                             f"only in zero padding, so their states are ambiguous; {fix}")
        if state[f] != state[prev] + 1:
            raise InputError(f"{where}: volume numbers jump from {state[prev]} ({prev.name}) to {state[f]} "
                             f"({f.name}): a state's volume is missing, so the pairing is ambiguous; {fix}")
    return ordered


def _agree(a: float, b: float) -> bool:
    return abs(a - b) <= GRID_RTOL * max(abs(a), abs(b))


def check_volume_grids(files: list, D0: int, apix: float, D: int, same_field_of_view: bool = False) -> str | None:
    """Check that ground-truth volumes lie on the particles' grid, before anything is trained.

    ``D0`` (px) and ``apix`` (Å) describe the particle stack, ``D`` the training box. Raises InputError
    naming the first volume whose box or voxel size contradicts the particles; returns one warning line when
    headers carry no voxel size and the particles' one was assumed, else None. ``same_field_of_view``: the
    layout states that the volumes cover the particles' field of view (module docstring).
    """
    step = max(1, -(-len(files) // MAX_HEADERS))
    checked = list(files[::step]) + ([files[-1]] if (len(files) - 1) % step else [])
    extent = D0 * apix  # Å across the particle box
    assumed = []
    for f in checked:
        shape, vol_apix = read_header(f)
        if len(set(shape)) != 1:
            raise InputError(f"{f}: ground-truth volume has shape {shape}; expected a cubic (D, D, D) map")
        box = shape[0]
        placeholder = vol_apix == 1.0 and not _agree(apix, 1.0)
        if vol_apix > 0 and not placeholder:
            if not _agree(box * vol_apix, extent):
                hint = (f"crop or pad it in real space to {D0} px" if _agree(vol_apix, apix) else
                        f"resample it to {D0} px at {apix:g} Å")
                raise InputError(f"{f}: ground-truth volume is {box} px at {vol_apix:g} Å ({box * vol_apix:g} "
                                 f"Å across) but the particles are {D0} px at {apix:g} Å ({extent:g} Å across), so "
                                 f"it cannot be scored against them; {hint}, or fix the header's voxel size")
        elif box != D0 and not same_field_of_view:
            raise InputError(f"{f}: ground-truth volume is {box} px with no voxel size in its header (says "
                             f"{vol_apix:g} Å) while the particles are {D0} px at {apix:g} Å, so its scale is "
                             "unknown; write the voxel size into the header (e.g. mrcfile: mrc.voxel_size = Å)")
        else:
            assumed.append((f, vol_apix, box))
        if box < D:
            raise InputError(f"{f}: ground-truth volume is {box} px, coarser than the {D}-px training box of the "
                             f"particles; choose data.box_size<={box} or give volumes of at least {D} px")
    if not assumed:
        return None
    f, vol_apix, box = assumed[0]
    return (f"{len(assumed)} of {len(checked)} ground-truth volume headers checked (first {f}) give no voxel size "
            f"(say {vol_apix:g} Å); assumed they cover the particles' {extent:g} Å field of view "
            f"({apix * D0 / box:g} Å per voxel at {box} px)")

