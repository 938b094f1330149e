"""The scripts in benchmarks/, run on small numbers so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_soak_runs_checks_and_records(tmp_path: Path) -> None:
    # 4 s, 10 workers, a sample a second, Redis blackholed for 1 s from t=1.6 s through the proxy
    # child: every part of the script runs. Its verdict is not asserted (a window this short
    # holds the fault's aftermath), but what it checks on every call is.
    result = subprocess.run(
        [
            sys.executable, "benchmarks/soak.py", "--duration", "4", "--interval", "1",
            "--workers", "10", "--fault-at", "0.4", "--fault-seconds", "1",
            "--out-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr  # 1: the verdict failed
    [document] = [json.loads(path.read_text()) for path in tmp_path.glob("soak-*.json")]
    assert len(list(tmp_path.glob("soak-*.md"))) == 1
    results = document["results"]
    assert len(results["samples"]) == 4
    assert results["totals"]["calls_get_or_load"] > 0
    assert results["violations"] == 0
    assert results["fault"]["healed_s"] is not None
    assert results["verdict"]["checks"]["at_rest"]["pass"]


def test_stampede_timeline_reports_each_round_and_the_ratio() -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/stampede_timeline.py", "-n", "200", "--rounds", "2",
         "--loader-ms", "5"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.lstrip().startswith(("guard ", "ideal ")) for line in lines) == 4, lines
    assert "guard/ideal" in lines[-1], lines
