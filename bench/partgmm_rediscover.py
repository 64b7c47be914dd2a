"""Re-run part discovery on a finished part-GMM run's stage-1 checkpoint with the current code, and score it.

    .venv/bin/python bench/partgmm_rediscover.py RUN_DIR [model.KEY=VALUE ...]

Loads ``RUN_DIR/checkpoints/partgmm_stage1.pt`` with the run's own ``config.yaml`` (model keys overridden by
the ``model.KEY=VALUE`` arguments, e.g. ``model.max_parts=12``), runs ``PartGMM.discover_parts`` and prints the
part count, the fine Gaussians per part and the part/anchor ARIs of ``PartGMM.part_scores`` as one JSON line.
No stage-2 training: stage 2 does not change the part labels, so the part ARI is the one a full run with
this code would report from the same stage 1.
"""

import argparse
import json
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.models.partgmm import PartGMM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("overrides", nargs="*", help="model.KEY=VALUE (VALUE parsed as YAML)")
    args = ap.parse_args()
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    dm = ParticleDataModule(cfg.data, seed=cfg.seed)
    dm.setup()
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if not key.startswith("model.") or key[6:] not in kwargs:
            raise SystemExit(f"{item}: expected model.KEY=VALUE with KEY one of {sorted(kwargs)}")
        kwargs[key[6:]] = yaml.safe_load(value)
    kwargs["resume"] = str(args.run_dir / "checkpoints" / "partgmm_stage1.pt")
    model = PartGMM(dm.info, **kwargs).eval()
    found = model.discover_parts()
    scores = model.part_scores(dm)
    scores.pop("gates", None)
    print(json.dumps({"run": str(args.run_dir), "n_parts": int(found["n_parts"]),
                      "fine_per_part": torch.bincount(model.anchor_part[model.fine_anchor]).tolist(),
                      **{k: v for k, v in scores.items() if "ari" in k}}))


if __name__ == "__main__":
    main()
