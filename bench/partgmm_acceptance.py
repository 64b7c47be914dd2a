"""Acceptance numbers of a finished part-aware Gaussian mixture run (model=partgmm*), next to the oracle.

    .venv/bin/python bench/partgmm_acceptance.py RUN_DIR [--oracle BACKPROJECT_RUN_DIR] [--out JSON]

Loads ``RUN_DIR/checkpoints/partgmm_stage2.pt`` with the run's own ``config.yaml`` and scores it directly
with the shared protocol (metrics/protocols.py ``per_conformation_fsc``: the state's representative
latent decoded and compared with the ground-truth volume), so the numbers do not depend on the evaluation
callback. Adds the part metrics of ``PartGMM.part_scores`` (ARI of parts/anchors vs nearest chain or
domain, per-state gate means) and, with ``--oracle``, the backprojection oracle's ``val/fsc_auc_mean``
from its ``metrics.json`` and the ratio.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cryobench_lab.data.particles import ParticleDataModule
from cryobench_lab.metrics.protocols import per_conformation_fsc
from cryobench_lab.models.partgmm import PartGMM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--oracle", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = OmegaConf.load(run / "config.yaml")
    dm = ParticleDataModule(cfg.data, seed=cfg.seed)
    dm.setup()
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    kwargs["resume"] = str(run / "checkpoints" / "partgmm_stage2.pt")
    model = PartGMM(dm.info, **kwargs).eval()
    t0 = time.perf_counter()
    emb = model.embed_all(dm.all_dataloader())
    order = torch.argsort(emb["index"])
    latent, labels = emb["latent"][order], torch.as_tensor(dm.info.labels)
    conf = per_conformation_fsc(lambda z, c: model.decode(z, c), labels, latent, None, dm.info.gt_volumes, dm.info.apix)
    result = {"run": str(run), "model": cfg.model.name, "data": cfg.data.name, "seed": cfg.seed,
              "fsc_auc_mean": conf["fsc_auc_mean"], "fsc_auc_per_state": [s["auc"] for s in conf["per_state"]],
              "fsc_res_0.5": conf["fsc_res_0.5"]}
    result.update(model.part_scores(dm))
    if args.oracle:
        oracle = json.loads((Path(args.oracle) / "metrics.json").read_text())["val/fsc_auc_mean"]
        result["oracle_fsc_auc_mean"] = oracle
        result["ratio_to_oracle"] = result["fsc_auc_mean"] / oracle
    result["scoring_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
