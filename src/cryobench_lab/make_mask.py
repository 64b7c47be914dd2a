"""Masks for focused classification: from a map by threshold + dilation + soft edge, or from PDB chains.

    python -m cryobench_lab.make_mask --volume map.mrc [--threshold T] --out mask.mrc
    python -m cryobench_lab.make_mask --structure model.pdb --chains U V G --box-size 64 --apix 3.9 \
        [--center X Y Z] --out mask.mrc

Both go through :func:`cryobench_lab.metrics.masks.volume_mask` (the ground-truth mask of the FSC metrics):
voxels above the threshold form the core, every voxel within ``dilate_px`` of it is 1, and a raised-cosine
edge ``edge_px`` wide falls to 0. Chains are rendered as the simulator renders atoms (one Gaussian per heavy
atom, integrating to its atomic number, σ = max(1 Å, 0.75·apix)), then masked at the default threshold
(half the 99.99th-percentile density of the selection).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from cryobench_lab.data.simulate import blur_sigma, read_states, render_volume
from cryobench_lab.errors import InputError
from cryobench_lab.io.mrc import read_mrc, write_mrc
from cryobench_lab.metrics.masks import volume_mask


def mask_from_volume(volume, threshold: float | None = None, dilate_px: float = 3.0, edge_px: float = 3.0) -> torch.Tensor:
    """Soft mask (D, D, D) in [0, 1] around ``volume`` (D, D, D) density above ``threshold`` (map units)."""
    return volume_mask(volume, threshold, dilate_px, edge_px)


def mask_from_chains(
    structure: str | Path,
    chains: list[str],
    box_size: int,
    apix: float,
    center: tuple[float, float, float] | None = None,
    dilate_px: float = 3.0,
    edge_px: float = 3.0,
) -> torch.Tensor:
    """Soft mask (D, D, D) around ``chains`` of a PDB/mmCIF file, on a ``box_size`` grid of ``apix`` Å.

    ``center`` (Å, the file's frame) is the position of the box centre (voxel ``D // 2``). Default
    ``(D // 2) · apix`` on each axis: a model fitted into a map whose MRC origin is 0. Structures written by
    the simulator (``gt_structures/``) are already centred: pass ``(0, 0, 0)``.
    """
    state = read_states(structure)[0]
    present = list(dict.fromkeys(state.chain_ids.tolist()))
    missing = sorted(set(chains) - set(present))
    if not chains or missing:
        raise InputError(
            f"{structure}: chains {missing or chains} not found (chains {''.join(present)}); pass chain IDs of that file"
        )
    selected = state.subset(np.isin(state.chain_ids, list(chains)), f"{state.name}_mask")
    origin = np.full(3, (box_size // 2) * apix) if center is None else np.asarray(center, dtype=np.float64)
    density = render_volume(selected, origin, box_size, apix, blur_sigma(apix))
    return volume_mask(density, None, dilate_px, edge_px)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cryobench_lab.make_mask", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--volume", metavar="MAP", help="map (.mrc) to threshold")
    src.add_argument("--structure", metavar="FILE", help="PDB/mmCIF file whose --chains are masked")
    ap.add_argument("--threshold", type=float, help="--volume: density threshold (default: half the 99.99th percentile)")
    ap.add_argument("--chains", nargs="+", help="--structure: chain IDs")
    ap.add_argument("--box-size", type=int, help="--structure: box in px")
    ap.add_argument("--apix", type=float, help="--structure: pixel size in Å")
    ap.add_argument("--center", type=float, nargs=3, metavar=("X", "Y", "Z"),
                    help="--structure: box centre in the file's frame, Å (default: box_size//2 · apix)")
    ap.add_argument("--dilate-px", type=float, default=3.0, help="dilation radius in px (default 3)")
    ap.add_argument("--edge-px", type=float, default=3.0, help="soft edge width in px (default 3)")
    ap.add_argument("--out", required=True, help="output mask .mrc")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.volume:
            vol, apix = read_mrc(args.volume)
            mask = mask_from_volume(vol, args.threshold, args.dilate_px, args.edge_px)
        else:
            if not (args.chains and args.box_size and args.apix):
                raise InputError("--structure needs --chains, --box-size and --apix; add them")
            apix = args.apix
            mask = mask_from_chains(args.structure, args.chains, args.box_size, apix, args.center,
                                    args.dilate_px, args.edge_px)
        write_mrc(args.out, mask.numpy(), apix=apix)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}: {float((mask > 0.5).float().mean()) * 100:.1f} % of the box inside (>0.5)")


if __name__ == "__main__":
    main()
