"""Command line: simulate a particle dataset from a preset or from your own structures.

    python -m cryobench_lab.simulate --preset tomotwin3 --out DIR [--box-size 64 --snr 0.1 ...]
    python -m cryobench_lab.simulate --structures a.pdb b.cif --out DIR
    python -m cryobench_lab.simulate --preset adk            # into the cache, reused afterwards
    python -m cryobench_lab.simulate --list
    python -m cryobench_lab.simulate --preset adk --out DIR --layout cryobench   # CryoBench's download layout

The logic is in :mod:`cryobench_lab.data.presets` and :mod:`cryobench_lab.data.simulate`.
"""

from __future__ import annotations

import argparse
import json
import sys

from cryobench_lab.data.presets import PRESETS, ensure_dataset, resolve_recipe, simulate_preset
from cryobench_lab.errors import InputError


def _parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:<11s} {p['description']}" for name, p in PRESETS.items())
    ap = argparse.ArgumentParser(
        prog="python -m cryobench_lab.simulate",
        description="Simulate a cryo-EM particle dataset (particles.mrcs/.star, poses.pkl, ctf.pkl, "
        "labels.npy, gt_volumes/, meta.json) from a built-in preset or from PDB/mmCIF files.",
        epilog=f"presets:\n{presets}\n\nWithout --out the dataset goes to the cache "
        "($CRYOBENCH_LAB_CACHE or ~/.cache/cryobench_lab) and is reused by later runs with the same "
        "settings.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="dataset recipe (default: tomotwin3, i.e. one state per --structures file)",
    )
    ap.add_argument(
        "--structures",
        nargs="+",
        metavar="FILE",
        help="PDB/mmCIF files replacing the preset's structures (tomotwin3: one complex each)",
    )
    ap.add_argument("--out", metavar="DIR", help="new output folder (default: the cache)")
    ap.add_argument("--cache-dir", metavar="DIR", help="cache folder when --out is not given")
    ap.add_argument("--box-size", type=int, help="image size D in pixels (even)")
    ap.add_argument("--apix", type=float, help="pixel size in Å (default: chosen so every state fits)")
    ap.add_argument("--n-particles", type=int, help="particles per state")
    ap.add_argument("--snr", type=float, help="signal-to-noise ratio, var(clean)/σ²_noise ('inf': no noise)")
    ap.add_argument("--seed", type=int, help="random seed")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other recipe key, VALUE as JSON, e.g. --set n_states=20 "
        "--set 'defocus_range=[8000,20000]' (repeatable)",
    )
    ap.add_argument(
        "--layout",
        choices=["cryobench_lab", "cryobench"],
        default="cryobench_lab",
        help="cryobench_lab: particles.mrcs/.star + pickles (default); cryobench: the published CryoBench "
        "layout (images/snr<SNR>/sorted_particles.<D>.txt, combined_poses.pkl, combined_ctfs.pkl, "
        "gt_latents.pkl, vols/<D>_org/, init_mask/mask.mrc), readable with data.layout=cryobench; needs --out",
    )
    ap.add_argument("--list", action="store_true", help="print the presets' full recipes and exit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _overrides(args) -> dict:
    overrides = {
        "box_size": args.box_size,
        "apix": args.apix,
        "n_particles": args.n_particles,
        "snr": args.snr,
        "seed": args.seed,
        "structures": args.structures,
    }
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item}: expected KEY=VALUE, e.g. --set n_states=20")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value  # a bare string such as a path
    return {k: v for k, v in overrides.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.list:
            for name in PRESETS:
                print(f"{name}: {json.dumps(resolve_recipe(name), default=str)}")
            return 0
        preset = args.preset or "tomotwin3"
        if args.preset is None and not args.structures:
            raise InputError(
                "nothing to simulate: pass --preset NAME or --structures FILE [FILE ...] (see --help)"
            )
        overrides = _overrides(args)
        if args.layout == "cryobench":
            return _simulate_cryobench(preset, args, overrides)
        if args.out:
            folder = simulate_preset(preset, args.out, overrides, progress=not args.quiet)
        else:
            folder = ensure_dataset(preset, args.cache_dir, overrides, progress=not args.quiet)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((folder / "meta.json").read_text())
    print(
        f"{folder}: {meta['n_particles']} particles, {meta['n_states']} states, D={meta['box_size']}, "
        f"apix={meta['apix']} Å, SNR={meta['snr']}, {meta['seconds']} s"
    )
    return 0


def _simulate_cryobench(preset: str, args, overrides: dict) -> int:
    """Simulate into a scratch folder next to ``--out``, then rewrite it in CryoBench's layout at ``--out``."""
    import shutil
    import tempfile
    from pathlib import Path

    from cryobench_lab.io.cryobench import write_cryobench_layout

    if not args.out:
        raise InputError("--layout cryobench needs --out DIR (the cache holds only the cryobench_lab layout)")
    out = Path(args.out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: output folder exists and is not empty; choose a new folder or delete it")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.sim-", dir=out.parent))
    try:
        folder = simulate_preset(preset, scratch / "dataset", overrides, progress=not args.quiet)
        write_cryobench_layout(folder, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    meta = json.loads((out / "replica.json").read_text())
    print(f"{out}: CryoBench layout, {meta['n_particles']} particles, {meta['n_states']} states, "
          f"D={meta['box_size']}, apix={meta['apix']} Å, SNR={meta['snr']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
