"""One-off: resolve every conf/experiment/cryobench_<dataset>_<method>.yaml, full and +smoke=true, into
tests/data/cryobench_experiments.json, the reference the composable experiment=cryobench must reproduce
(tests/test_cryobench.py). Run from the repository root before the per-pair files are deleted:

    PYTHONPATH=src python tests/data/record_cryobench_experiments.py
"""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cryobench_lab.config import register_configs

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
OUT = REPO / "tests" / "data" / "cryobench_experiments.json"
SECTIONS = ("data", "model", "trainer", "metrics", "logger")  # what the experiment files set; the rest is untouched


def main() -> None:
    register_configs()
    names = sorted(p.stem for p in (CONF / "experiment").glob("cryobench_*.yaml"))
    record = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in names:
            for mode, extra in (("full", []), ("smoke", ["+smoke=true"])):
                cfg = compose(config_name="train", overrides=[f"experiment={name}", "output_dir=.", *extra])
                resolved = OmegaConf.to_container(cfg, resolve=True)
                record[f"{name}/{mode}"] = {k: resolved[k] for k in SECTIONS}
    OUT.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"{len(record)} configs -> {OUT}")


if __name__ == "__main__":
    main()
