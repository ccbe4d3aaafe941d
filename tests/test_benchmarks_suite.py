"""benchmarks/ is one package with one entry point, `python -m benchmarks SUITE`, and no path hacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The suites run from the repository root as `python -m benchmarks`; PYTHONSAFEPATH (set by CI so
# that tests import the installed wheel) would hide the checkout's `benchmarks` package.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}


def test_no_sys_path_edits_in_benchmarks():
    offenders = [p.name for p in (ROOT / "benchmarks").glob("*.py") if "sys.path" in p.read_text()]
    assert not offenders, offenders


@pytest.mark.parametrize("suite", ["accuracy", "spatial", "scaling", "inference", "end-to-end", "minibatch",
                                   "clustering", "knn", "make-large", "run"])
def test_every_suite_answers_help(suite: str):
    res = subprocess.run([sys.executable, "-m", "benchmarks", suite, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, check=False, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: python -m benchmarks {suite}"), res.stdout[:200]


def test_clustering_suite_runs_and_prints_its_table():
    res = subprocess.run([sys.executable, "-m", "benchmarks", "clustering", "--sizes", "1500"], cwd=ROOT,
                         capture_output=True, text=True, timeout=240, check=False, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    row = [line for line in res.stdout.splitlines() if line.startswith("| 1,500 |")]
    assert row and row[0].rstrip().endswith("|"), res.stdout
