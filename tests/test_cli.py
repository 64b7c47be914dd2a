"""The command line as a new user meets it: typos refused in one line with a suggestion, our own --help and
--version, and --help on every tool."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cryobench_lab import __version__


def _cli(*args, module="cryobench_lab"):
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, env=env)


def _one_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-500:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("override", ["data.snrr=0.1", "+data.snrr=0.1"])
def test_misspelt_key_refused_with_suggestion(override):
    line = _one_line(_cli(override))
    assert "data.snrr" in line and "`snr`" in line
    assert "To append" not in line  # Hydra's advice leads to a run at the wrong SNR


def test_addition_refused_in_multirun_too():
    assert "`snr`" in _one_line(_cli("-m", "+data.snrr=0.1,0.2"))


def test_misspelt_option_refused_with_suggestion():
    line = _one_line(_cli("model=hydr"))
    assert "`hydra`" in line and "search path" not in line.lower()


def test_help_is_ours():
    proc = _cli("--help")
    assert proc.returncode == 0
    assert "powered by Hydra" not in proc.stdout and "cryobench-lab" in proc.stdout
    for group in ("data", "model", "trainer", "logger"):
        assert f"\n  {group} " in proc.stdout
    assert "_cryobench_common" not in proc.stdout and "_study" not in proc.stdout  # internal configs hidden
    assert proc.stdout.count("cryobench-lab model=") + proc.stdout.count("cryobench-lab -m") >= 5


def test_version_is_the_package_version():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cryobench-lab {__version__}"


@pytest.mark.parametrize("tool", ["eval", "compare", "leaderboard", "simulate", "make_mask", "wandb_tools"])
def test_every_tool_has_help(tool):
    proc = _cli("--help", module=f"cryobench_lab.{tool}")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("name", ["val_adk", "val_assembly", "val_tomotwin3"])
def test_validation_family_recipes_resolve(name):
    """Each validation preset composes and its recipe keys are ones the simulator knows (an unknown key would
    be refused at start-up), and it differs from its reporting preset in seed and more."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from cryobench_lab.cli import CONF_DIR
    from cryobench_lab.config import register_configs
    from cryobench_lab.data.presets import resolve_recipe

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        data = compose(config_name="train", overrides=[f"data={name}", "output_dir=."]).data
    overrides = dict(box_size=data.box_size, snr=data.snr, seed=data.sim_seed, n_particles=data.n_particles,
                     structures=list(data.structures) if data.structures else None)
    overrides.update(OmegaConf.to_container(data.recipe) if data.recipe is not None else {})
    recipe = resolve_recipe(data.preset, overrides)
    reported = resolve_recipe(data.preset)
    assert recipe["seed"] != reported["seed"]
    assert sum(recipe[k] != reported[k] for k in reported) >= 2


def test_unknown_recipe_key_is_refused():
    from cryobench_lab.data.presets import resolve_recipe
    from cryobench_lab.errors import InputError

    with pytest.raises(InputError, match="n_statez"):
        resolve_recipe("adk", {"n_statez": 3})


def test_provenance_records_the_hardware(monkeypatch):
    import torch

    from cryobench_lab.provenance import environment

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    hw = environment()["hardware"]
    assert hw["cpu_cores_available"] >= 1 and hw["cpu_model"]
    assert hw["torch_threads"] == torch.get_num_threads()
    assert hw["env"]["OMP_NUM_THREADS"] == "1"
