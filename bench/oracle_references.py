"""Reference reconstructions of issue 25 side by side: old oracle, new oracle, consensus floor (and ablations).

For each preset it builds the DataModule as a run would (``data=<preset>`` plus overrides), backprojects every
image once per accumulator (per-state at padding 1 and 2, one consensus volume at padding 1) and solves each
variant from the same sums:

- ``old oracle``: pad 1, Tikhonov (``wiener=constant``), no gridding correction (model=backproject);
- ``oracle pad1``: pad 1, truth-SSNR Wiener, no correction;  ``oracle pad2 nocorr``: pad 2, truth-SSNR Wiener;
- ``new oracle``: pad 2, truth-SSNR Wiener, gridding correction (model=oracle, the scorer's ``oracle``);
- ``floor``: one volume of all images, pad 1, half-map-FSC Wiener (model=consensus, the scorer's ``floor``).

Every volume is scored against every state's ground truth (metrics/fsc.py), unmasked and under the
ground-truth-support mask (metrics/masks.py ``support_mask``); with ``--dilate`` other mask dilations.

    python bench/oracle_references.py --presets tomotwin3 adk [--override data.seed=1] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from cryobench_lab.callbacks.references import SETTINGS
from cryobench_lab.cli import CONF_DIR
from cryobench_lab.config import register_configs
from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.metrics.fsc import fsc_summary
from cryobench_lab.metrics.masks import support_mask
from cryobench_lab.models.backproject import Backprojection

VARIANTS = {  # name: (accumulator, solve settings)
    "old oracle": ("pad1", dict(wiener="constant", gridding_correction=False)),
    "oracle pad1": ("pad1", dict(wiener="oracle", gridding_correction=False)),
    "oracle pad2 nocorr": ("pad2", dict(wiener="oracle", gridding_correction=False)),
    "new oracle": ("pad2", dict(wiener="oracle", gridding_correction=True)),
    "floor": ("consensus", dict(wiener="fsc", gridding_correction=False)),
}


def datamodule(preset: str, overrides: list[str]) -> ParticleDataModule:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data={preset}", "model=backproject", "output_dir=/tmp/unused", *overrides])
    dm = ParticleDataModule(cfg.data, seed=cfg.seed)
    dm.setup()
    return dm


def measure(dm: ParticleDataModule, dilations: list[float]) -> dict:
    info = dm.info
    accumulators = {
        "pad1": Backprojection(info, pad=1),
        "pad2": Backprojection(info, pad=2),
        "consensus": Backprojection(info, **{k: v for k, v in SETTINGS["floor"].items() if k != "name"}),
    }
    for batch in dm.all_dataloader():
        for model in accumulators.values():
            model.training_step(batch, 0)
    gt = info.gt_volumes
    masks = {"unmasked": None, **{f"gtmask_dilate{d:g}": support_mask(gt, dilate_px=d) for d in dilations}}
    out = {}
    for name, (acc, settings) in VARIANTS.items():
        model = accumulators[acc]
        model.wiener, model.gridding_correction = settings["wiener"], settings["gridding_correction"]
        model.solve()
        rows = {}
        for key, mask in masks.items():
            aucs = [fsc_summary(model.volumes[0 if acc == "consensus" else s], gt[s], apix=info.apix, mask=mask)["auc"]
                    for s in range(info.n_states)]
            rows[key] = {"mean": float(np.mean(aucs)), "per_state": aucs}
        out[name] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tomotwin3", "adk"])
    ap.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. data.seed=1")
    ap.add_argument("--dilate", nargs="+", type=float, default=[3.0], help="support-mask dilations (px)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    register_configs()
    torch.set_grad_enabled(False)
    results = {}
    for preset in args.presets:
        res = measure(datamodule(preset, args.override), args.dilate)
        results[preset] = res
        keys = list(next(iter(res.values())))
        print(f"\n{preset} {' '.join(args.override)}\n| reference | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for name, rows in res.items():
            print(f"| {name} | " + " | ".join(f"{rows[k]['mean']:.4f}" for k in keys) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"overrides": args.override, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
