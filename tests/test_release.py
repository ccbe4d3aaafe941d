"""The release pieces agree: workflows call scripts that exist, modules name what the release pushes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
yaml = pytest.importorskip("yaml")


def _names(flavour: str, kind: str) -> str:
    return subprocess.run([str(ROOT / "containers" / "names.sh"), flavour, kind], capture_output=True, text=True,
                          check=True).stdout.strip()


def _workflow(name: str) -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


@pytest.mark.parametrize("name", ["ci.yml", "release.yml"])
def test_workflow_steps_run_scripts_of_this_repository(name: str):
    wf = _workflow(name)
    assert wf["jobs"], name
    scripts = set()
    for job in wf["jobs"].values():
        assert job["runs-on"].startswith("ubuntu"), job
        for step in job["steps"]:
            assert "run" in step or "uses" in step, step
            scripts.update(re.findall(r"((?:containers|\.ci)/[\w.]+)", step.get("run", "")))
    for script in scripts:
        assert (ROOT / script.replace("scrcl-cli/", "")).is_file(), f"{name} runs {script}, which is not in the repository"


def test_release_is_tag_triggered_and_publishes_with_trusted_publishing():
    wf = _workflow("release.yml")
    on = wf[True] if True in wf else wf["on"]  # PyYAML reads the key `on` as True
    assert on["push"]["tags"] == ["v*"]
    assert wf["jobs"]["pypi"]["permissions"]["id-token"] == "write"
    assert any(step.get("uses", "").startswith("pypa/gh-action-pypi-publish") for step in wf["jobs"]["pypi"]["steps"])


@pytest.mark.parametrize("module", ["train", "embed", "cluster"])
def test_modules_name_the_images_and_sifs_the_release_pushes(module: str):
    text = (ROOT / "nextflow" / "modules" / "scrcl" / module / "main.nf").read_text()
    named = set(re.findall(r"'((?:oras://)?ghcr\.io/[^']+)'", text))
    published = {_names(f, k) for f in ("cpu", "cuda") for k in ("image", "sif")}
    assert named and named <= published, named - published


def test_names_follow_the_package_version():
    from scrcl_cli import __version__

    assert _names("cpu", "image").endswith(f":{__version__}")
    assert _names("cuda", "sif") == f"oras://ghcr.io/scrcl-cli/scrcl-cli:{__version__}-cuda-sif"
