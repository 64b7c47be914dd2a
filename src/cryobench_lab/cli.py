"""Start-up checks shared by the command-line entry points: one-line errors instead of tracebacks."""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from cryobench_lab.config import validate
from cryobench_lab.errors import InputError
from cryobench_lab.run_folder import check_not_busy, first_process

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TYPED_SECTIONS = ("data", "trainer", "logger", "metrics", "poses")  # strict schemas in config.py
EXTRA_TOP_KEYS = ("smoke",)  # top-level keys a user may add with +key=value (experiment configs read them)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` as one line on stderr and exit non-zero."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(code)


def config_groups() -> dict[str, list[str]]:
    """User-facing config groups and their options (``conf/<group>/<option>.yaml``; names starting with ``_``
    are internal)."""
    groups = {}
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra"))):
        groups[folder.name] = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("_"))
    return groups


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" — did you mean `{close[0]}`?" if close else ""


def _key_error(key: str, schema) -> str:
    """One line for an unknown dotted key, with the closest existing key of its section."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    keys = list(node.keys()) if OmegaConf.is_dict(node) else []
    return f"config: unknown key {key}{_suggest(leaf, keys)} (list valid keys with: python -m cryobench_lab --cfg job)"


def _check_additions(overrides: list[str]) -> None:
    """``+data.snrr=0.1`` would add a key nobody reads: refuse additions to the typed sections and unknown top-level
    additions (config groups such as ``+sweep=`` and ``+size=`` stay allowed)."""
    from cryobench_lab.config import TrainConfig

    schema = OmegaConf.structured(TrainConfig)
    groups = config_groups()
    for item in overrides:
        if not item.startswith("+"):
            continue
        key = item.lstrip("+").split("=", 1)[0]
        top = key.split(".", 1)[0]
        if top in TYPED_SECTIONS and OmegaConf.select(schema, key, default="__missing__") == "__missing__":
            fail(_key_error(key, schema))
        if "." not in key and top not in groups and top not in EXTRA_TOP_KEYS and top not in schema:
            fail(f"config: unknown key {key}{_suggest(key, [*groups, *EXTRA_TOP_KEYS, *schema.keys()])}")


def _composition_error(err: Exception) -> str:
    """Hydra's multi-line composition errors as one line with a suggestion."""
    text = f"{err} {err.__cause__ or ''}"
    missing_option = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        options = config_groups().get(group, [])
        return f"config: {group}={option} is not an option{_suggest(option, options)} (options: {', '.join(options)})"
    bad_key = re.search(r"Could not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
    if bad_key:
        from cryobench_lab.config import TrainConfig

        return _key_error(bad_key.group(1), OmegaConf.structured(TrainConfig))
    text = re.sub(r"\s*Config search path:.*", "", text.replace("\n", " ").replace("\t", " "))
    return f"config: {text} (list valid keys with: python -m cryobench_lab --cfg job)"


def _interpolation_error(err: InterpolationResolutionError) -> str:
    """A value reading a key that is not set, in one line (experiment=cryobench reads the dataset's data.hints)."""
    reason = " ".join(str(err.msg).split()).split(" full_key:")[0]
    unset = re.search(r"(?:key '|value: )([\w.]+)", reason)
    if not unset:
        return f"config: {err.full_key} cannot be resolved ({reason})"
    key = unset.group(1)
    advice = f"set {key}=<value>"
    if key.startswith("data.hints."):
        advice = f"experiment=cryobench sizes the methods from the dataset's hints: use data=cryobench_<dataset> or {advice}"
    return f"config: {err.full_key} reads {key}, which is not set; {advice}"


def check_overrides(argv: list[str]) -> None:
    """Compose the config once before Hydra runs, so a wrong key or group fails in one line.

    Multirun sweeps and Hydra's own flags (``--cfg``, ``--hydra-help``) are left to Hydra.
    """
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra", "output_dir", "-"))]
    _check_additions(overrides)
    if any(a.startswith("-") for a in argv):
        return
    # output_dir interpolates Hydra's runtime config, which exists only inside a Hydra run
    overrides.append("output_dir=.")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except Exception as err:  # Hydra/OmegaConf composition errors carry multi-line messages
        fail(_composition_error(err))
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))  # resolves interpolations on the way
    except InterpolationResolutionError as err:
        fail(_interpolation_error(err))
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
