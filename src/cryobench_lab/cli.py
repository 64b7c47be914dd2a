"""Start-up checks shared by the command-line entry points: one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cryobench_lab.config import validate
from cryobench_lab.errors import InputError
from cryobench_lab.run_folder import check_not_busy, first_process

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit non-zero."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def check_overrides(argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so a wrong key or group fails in one line.

    Multirun sweeps and Hydra's own flags (``--help``, ``--cfg``) are left to Hydra.
    """
    if any(a.startswith("-") for a in argv):
        return
    # output_dir interpolates Hydra's runtime config, which exists only inside a Hydra run
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra", "output_dir"))] + ["output_dir=."]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except Exception as err:  # Hydra/OmegaConf composition errors carry multi-line messages
        cause = f": {err.__cause__}" if err.__cause__ is not None else ""
        text = f"{err}{cause}".replace("\n", " ").replace("\t", " ")
        fail(f"config: {text} (list valid keys with: python -m cryobench_lab --cfg job)")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        fail(f"config: {', '.join(missing)} must be set, e.g. {missing[0]}=<value>")
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    try:
        validate(cfg)
        check_run_dir_parent(run_dir or "outputs")
        if run_dir and "${" not in run_dir and first_process():  # DDP children run in the holder's folder
            check_not_busy(Path(run_dir))
    except InputError as err:
        fail(str(err))


def check_run_dir_parent(run_dir: str) -> None:
    """InputError when Hydra could not create ``run_dir``: its nearest existing ancestor must be a writable folder.

    Only the part before any ``${...}`` interpolation is examined.
    """
    path = Path(run_dir.split("${")[0] or ".").absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise InputError(f"hydra.run.dir={run_dir}: {path} is not a folder; set hydra.run.dir=<a path under a folder>")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"hydra.run.dir={run_dir}: {path} is not writable; set hydra.run.dir=<writable path>")
