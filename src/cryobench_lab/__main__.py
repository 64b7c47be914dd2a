"""``python -m cryobench_lab model=<method> data=<dataset> [...]``: compose the config and call ``run``."""

import sys

import hydra
from omegaconf import DictConfig

from cryobench_lab.cli import CONF_DIR, check_overrides, fail
from cryobench_lab.config import register_configs
from cryobench_lab.errors import InputError, TrainingError

register_configs()


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
    check_overrides(sys.argv[1:])
    _app()


if __name__ == "__main__":
    main()
