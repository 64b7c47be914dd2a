"""Run-folder reliability cases of issue 26 (items 1, 5, 7, 8, 9, 10, 11): observed before and after a fix.

Runs ``tests/test_runsafe.py`` (slow tests included; each test reproduces one failure of the issue) against
the source tree of a git revision and against this checkout, and records each test's outcome and first
failure line:

    python bench/reliability_cases.py --before f2a0479 --out bench/results/2026-12-08_reliability_cases.json

The revision's ``src/`` and ``conf/`` are extracted with ``git archive`` into a temporary folder; the tests
are always this checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def outcomes(src: Path, junit: Path) -> dict[str, str]:
    """{test id: "passed" | "failed: <first line>" | "skipped"} of tests/test_runsafe.py run on ``src``."""
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                    f"--junitxml={junit}", str(REPO / "tests" / "test_runsafe.py")], cwd=REPO, env=env, check=False)
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            line = (problem.get("message") or "").strip().splitlines()[0] if problem.get("message") else ""
            result[case.get("name")] = f"failed: {line[:300]}"
        elif case.find("skipped") is not None:
            result[case.get("name")] = "skipped"
        else:
            result[case.get("name")] = "passed"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the code before the fix")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "src", "conf"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        before = outcomes(tree / "src", Path(tmp) / "before.xml")
        after = outcomes(REPO / "src", Path(tmp) / "after.xml")
    table = {name: {"before": before.get(name), "after": after.get(name)} for name in sorted(set(before) | set(after))}
    args.out.write_text(json.dumps({"before": args.before, "cases": table}, indent=2) + "\n")
    for name, row in table.items():
        print(f"{name}: before {row['before']} | after {row['after']}")


if __name__ == "__main__":
    main()
