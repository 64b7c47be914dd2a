"""``python -m cryobench_lab model=<method> data=<dataset> [...]``: compose the config and call ``run``."""

import sys

import hydra
from omegaconf import DictConfig

from cryobench_lab import __version__
from cryobench_lab.cli import CONF_DIR, check_overrides, config_groups, fail
from cryobench_lab.config import register_configs
from cryobench_lab.errors import InputError, TrainingError

register_configs()

EXAMPLES = """\
  cryobench-lab model=hydra data=tomotwin3                        # the headline run: mixture of neural fields
  cryobench-lab model=segvae data=adk logger=csv                  # segment VAE on the AdK closed->open path
  cryobench-lab model=backproject data=tomotwin3 data.snr=0.01    # the oracle (truth-given) reconstruction
  cryobench-lab model=hydra data=custom data.particles=p.star data.labels=l.npy data.gt_volumes=vols/
  cryobench-lab -m +sweep=segmentation_ablation                   # an ablation study (then: python -m cryobench_lab.compare multirun/segmentation_ablation)"""


def usage() -> str:
    groups = "\n".join(f"  {name:<10} {', '.join(options)}" for name, options in config_groups().items())
    return f"""cryobench-lab {__version__}: heterogeneous cryo-EM reconstruction and benchmarking.

Trains one method on one dataset, scores it against the ground truth with CryoBench's FSC protocols and
classification metrics, and writes maps, metrics and figures. Settings are key=value overrides.

usage: cryobench-lab [group=option ...] [key=value ...]      (or: python -m cryobench_lab ...)
       cryobench-lab -m [group=a,b ...] [key=v1,v2 ...]       (a sweep: one run per combination)

config groups and their options:
{groups}

examples:
{EXAMPLES}

outputs: outputs/<data>/<model>/<time>/ (set hydra.run.dir=<folder> to choose): metrics.json, volumes/*.mrc,
figures/*.png, config.yaml, provenance.json, checkpoints/, csv/metrics.csv. Rerun the same command with
hydra.run.dir=<folder> to resume. All keys and defaults: cryobench-lab --cfg job. Other tools:
python -m cryobench_lab.{{eval,compare,leaderboard,simulate,make_mask,wandb_tools}} --help."""


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from cryobench_lab.run import run

    try:
        run(cfg)
    except InputError as err:
        fail(str(err))
    except TrainingError as err:
        fail(str(err), code=3)


def main() -> None:
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return
    if "--version" in argv:
        print(f"cryobench-lab {__version__}")
        return
    check_overrides(argv)
    _app()


if __name__ == "__main__":
    main()
