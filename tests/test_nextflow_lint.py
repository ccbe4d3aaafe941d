"""nextflow/lint.py: `nf-core modules lint` offline, failing only on failures not in nextflow/lint_expected.yml.

The classification is tested here with made-up results. The lint itself runs when nf-core tools
is importable, or with the interpreter in $NFCORE_LINT_PYTHON (.ci/run installs nf-core into a
virtualenv of its own and sets it); otherwise that test is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "nextflow" / "lint.py"


def _load():
    pytest.importorskip("yaml")
    spec = importlib.util.spec_from_file_location("nextflow_lint", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_classify_separates_expected_unexpected_and_stale():
    lint = _load()
    r = lint.Result
    failed = [
        r("scrcl/train", "test_snapshot_exists", "no snap", "x"),
        r("scrcl/embed", "test_snapshot_exists", "no snap", "x"),
        r("scrcl/embed", "docker_tag", "unresolved", "x"),
        r("scrcl/cluster", "meta_yml_valid", "bad meta.yml", "x"),
    ]
    expected = [
        lint.Expected("*", "test_snapshot_exists", "needs nf-test"),
        lint.Expected("scrcl/embed", "docker_tag", "needs nextflow inspect"),
        lint.Expected("scrcl/train", "docker_tag", "needs nextflow inspect"),
    ]
    unexpected, stale = lint.classify(failed, expected)
    assert unexpected == [failed[3]], "a failure of a listed test in another module is still unexpected"
    assert stale == [expected[2]]
    assert lint.classify([], expected) == ([], expected)


def test_expected_failures_name_modules_tests_and_reasons():
    lint = _load()
    entries = lint.load_expected()
    assert entries, "the lint runs without Nextflow, so some failures are expected"
    for e in entries:
        assert e.module == "*" or e.module in lint.MODULES, e
        assert e.test and e.test.replace("_", "").isalnum(), e
        assert len(e.why.split()) >= 8, f"say why {e.test} cannot pass here"
    assert len({(e.module, e.test) for e in entries}) == len(entries)
    # the schema checks are never listed: offline they are reported as not checked, not failed
    assert not {e.test for e in entries} & set(lint.SCHEMA_TESTS)


def _lint_python() -> str:
    python = os.environ.get("NFCORE_LINT_PYTHON")
    if python:
        return python
    if importlib.util.find_spec("nf_core") is None:
        pytest.skip("nf-core tools is not installed here and NFCORE_LINT_PYTHON is not set (.ci/run sets it)")
    return sys.executable


def test_nf_core_lint_has_no_unexpected_failure_and_leaves_the_checkout_alone(tmp_path):
    python = _lint_python()
    tracked = subprocess.run(["git", "status", "--porcelain", "--", "modules"], cwd=REPO, capture_output=True, text=True)
    out = tmp_path / "lint.json"
    run = subprocess.run([python, str(SCRIPT), "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert results["unexpected"] == []
    assert len(results["passed"]) >= 100, "the lint ran its checks on the three modules"
    assert {r["module"] for r in results["passed"]} == {"scrcl/train", "scrcl/embed", "scrcl/cluster"}
    assert not [r for r in results["failed"] if r["test"] == "lint_rewrote_file"]
    after = subprocess.run(["git", "status", "--porcelain", "--", "modules"], cwd=REPO, capture_output=True, text=True)
    assert after.stdout == tracked.stdout, "nf-core lint ran on a copy, not on the checkout"
