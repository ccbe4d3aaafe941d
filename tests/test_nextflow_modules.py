"""Offline checks of the Nextflow modules in modules/scrcl/scrcl and the example pipeline in nextflow/.

Nextflow and nf-test cannot run here, so these tests
  * parse every main.nf, meta.yml, environment*.yml and tests/*.nf.test and check the nf-core
    module rules that `nf-core modules lint` would check;
  * render each module's `script:` and `stub:` sections with test values (meta.id, task.cpus,
    task.ext.args, prefix, task.accelerator on and off) through tests/nextflow_helpers.py and
    run them in bash, in a task-like folder, against the real `scrcl-cli` and
    the PBMC example packaged in scrcl_cli/data; then every declared output must exist and every
    versions `eval` command must print a version, run the way Nextflow runs it.
They do not replace `nf-test test modules/scrcl/scrcl/` where Nextflow is installed (see nextflow/README.md).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from nextflow_helpers import (
    STANDARD_LABELS,
    WHEN_LINE,
    Module,
    ModuleError,
    Staged,
    declared_paths,
    element_name,
    eval_commands,
    make_context,
    output_context,
    parse_module,
    render_section,
    render_string,
    run_bash_script,
    run_eval,
)

REPO = Path(__file__).resolve().parents[1]
NEXTFLOW = REPO / "nextflow"
MODULE_ROOT = REPO / "modules" / "scrcl" / "scrcl"
# the module tests' data: the PBMC example packaged with scrcl-cli (as the nf-test files read it)
PACKAGED_DATA = REPO / "scrcl_cli" / "data"
PBMC = "pbmc68k_reduced_700.h5ad"

MODULES = ["train", "embed", "cluster"]
CPU_IMAGE = "ghcr.io/scrcl-cli/scrcl-cli:0.1.0"
CUDA_IMAGE = "ghcr.io/scrcl-cli/scrcl-cli:0.1.0-cuda"
CPU_SIF = "oras://ghcr.io/scrcl-cli/scrcl-cli:0.1.0-sif"
CUDA_SIF = "oras://ghcr.io/scrcl-cli/scrcl-cli:0.1.0-cuda-sif"
TRAIN_CPU_IMAGE = "ghcr.io/scrcl-cli/scrcl-cli:0.1.0-train-cpu"
TRAIN_CPU_SIF = "oras://ghcr.io/scrcl-cli/scrcl-cli:0.1.0-train-cpu-sif"
# what each module takes besides tuple val(meta), path(h5ad)
INPUTS = {
    "train": ["tuple val(meta), path(h5ad)"],
    "embed": ["tuple val(meta), path(h5ad)", "tuple val(meta2), path(model)"],
    "cluster": ["tuple val(meta), path(h5ad)", "tuple val(meta2), path(model)"],
}
# files downstream modules rely on in a model directory (the CLI contract)
MODEL_FILES = ["scrcl_model.json", "encoder_fused.onnx", "encoder_cell.onnx", "weights.pt", "genes.txt"]
VERSION = re.compile(r"^\d+\.\d+(\.\d+)?\S*$")
ALLOWED_TYPES = {"map", "file", "directory", "string", "integer", "float", "boolean", "list", "eval"}
EDAM_HDF5 = "http://edamontology.org/format_3590"



def module(name: str) -> Module:
    return parse_module(MODULE_ROOT / name / "main.nf")


def meta_yml(name: str) -> dict:
    return yaml.safe_load((MODULE_ROOT / name / "meta.yml").read_text())


def nf_test_args(name: str, process: str, config: str = "nextflow.config", module_args: str | None = None) -> str:
    """ext.args of a process in a module's tests/nextflow.config (shared with nf-test), with
    params.module_args (set by one test's params block) where the config appends it."""
    text = (MODULE_ROOT / name / "tests" / config).read_text()
    block = re.search(rf"withName:\s*'{process}'\s*\{{(.*?)\n    \}}", text, re.DOTALL)
    assert block, f"{name}/tests/{config} has no block for {process}"
    line = re.search(r"^\s*ext\.args\s*=\s*(.+)$", block.group(1), re.MULTILINE)
    assert line, f"{name}/tests/{config} sets no ext.args for {process}"
    expr = line.group(1).strip()
    literal = re.fullmatch(r"'([^']*)'", expr)
    if literal:
        return literal.group(1)
    # { ['<literal>', params.module_args].findAll().join(' ') } or { params.module_args ?: '' }
    joined = re.fullmatch(r"\{\s*\['([^']*)',\s*params\.module_args\]\.findAll\(\)\.join\(' '\)\s*\}", expr)
    alone = re.fullmatch(r"\{\s*params\.module_args\s*\?:\s*''\s*\}", expr)
    assert joined or alone, f"{name}/tests/{config}: ext.args of {process} is not a form this test reads: {expr}"
    parts = [joined.group(1)] if joined else []
    return " ".join([*parts, *([module_args] if module_args else [])])


def context(mod: Module, *, meta_id: str, inputs: dict, **kwargs) -> dict:
    return make_context(process=mod.name, meta={"id": meta_id}, inputs=inputs, **kwargs)


def default_inputs(name: str, meta_id: str = "sample") -> dict:
    inputs = {"h5ad": Staged(f"{meta_id}_input.h5ad")}
    if name != "train":
        inputs["model"] = Staged("reference_model")
    return inputs


# ============================================================================ static checks


def test_repository_is_an_nfcore_modules_repository():
    """nf-core tools reads .nf-core.yml at the git root and finds modules/<org_path>/<tool>/<subtool>."""
    config = yaml.safe_load((REPO / ".nf-core.yml").read_text())
    assert config["repository_type"] == "modules"
    assert REPO / "modules" / config["org_path"] / "scrcl" == MODULE_ROOT
    assert sorted(p.parent.name for p in MODULE_ROOT.glob("*/main.nf")) == sorted(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_has_the_nfcore_file_layout(name):
    root = MODULE_ROOT / name
    for rel in [
        "main.nf",
        "meta.yml",
        "environment.yml",
        "environment.gpu.yml",
        "tests/main.nf.test",
        "tests/nextflow.config",
        "tests/main.gpu.nf.test",
        "tests/nextflow.gpu.config",
    ]:
        assert (root / rel).is_file(), f"missing {root / rel}"


@pytest.mark.parametrize("name", MODULES)
def test_main_nf_name_tag_labels_and_when_follow_nfcore(name):
    mod = module(name)
    assert mod.name == f"SCRCL_{name.upper()}"
    assert mod.name == mod.name.upper()
    assert mod.tag() in ('"${meta.id}"', '"$meta.id"')
    labels = mod.labels()
    standard = [label for label in labels if label in STANDARD_LABELS]
    assert len(standard) == 1, f"exactly one standard resource label, found {labels}"
    assert set(labels) - set(STANDARD_LABELS) == {"process_gpu"}, f"only process_gpu may be added: {labels}"
    assert len(labels) == len(set(labels))
    assert mod.when == [WHEN_LINE]
    assert mod.script is not None
    assert mod.stub is not None, "a stub: section is required"
    for word in ("initOptions", "saveFiles", "getSoftwareName", "getProcessName", "publishDir"):
        assert word not in mod.path.read_text(), f"deprecated DSL2 syntax: {word}"


@pytest.mark.parametrize("name", MODULES)
def test_main_nf_inputs_args_prefix_and_single_cli_call(name):
    mod = module(name)
    assert mod.inputs == INPUTS[name]
    for section in (mod.script, mod.stub):
        stmts = [s.strip() for s in section.statements if s.strip()]
        assert "def args = task.ext.args ?: ''" in stmts
        assert 'prefix = task.ext.prefix ?: "${meta.id}"' in stmts, "prefix without def, so outputs can use it"
    rendered = render_section(mod.script, context(mod, meta_id="s1", inputs=default_inputs(name), args="--x 1"))
    lines = [ln.strip() for ln in rendered.script.replace("\\\n", " ").splitlines() if ln.strip()]
    assert len(lines) == 1, f"the script is one scrcl-cli call, got {lines}"
    words = lines[0].split()
    assert words[:3] == ["scrcl-cli", name, "sample_input.h5ad"]
    assert words[-2:] == ["--x", "1"], "task.ext.args goes last, so it can override"


@pytest.mark.parametrize("name", MODULES)
def test_script_renders_device_threads_and_args_from_the_task(name):
    mod = module(name)
    for accelerator, device in ((None, "cpu"), (1, "cuda")):
        for cpus in (1, 6):
            ctx = context(mod, meta_id="s1", inputs=default_inputs(name), cpus=cpus, args="--seed 7", accelerator=accelerator)
            script = render_section(mod.script, ctx).script
            assert f"--device {device} " in script.replace("\\\n", " ")
            assert f"--threads {cpus} " in script.replace("\\\n", " ")
            assert script.rstrip().endswith("--seed 7")
            assert f"--device {'cpu' if device == 'cuda' else 'cuda'}" not in script
    # without ext.args nothing is appended; prefix defaults to meta.id and follows ext.prefix
    default = render_section(mod.script, context(mod, meta_id="s1", inputs=default_inputs(name)))
    assert default.ctx["prefix"] == "s1"
    assert "null" not in default.script
    custom = render_section(mod.script, context(mod, meta_id="s1", inputs=default_inputs(name), prefix="run7"))
    assert custom.ctx["prefix"] == "run7"
    assert "run7" in custom.script


@pytest.mark.parametrize("name", MODULES)
def test_script_refuses_a_prefix_whose_h5ad_would_overwrite_the_input(name):
    mod = module(name)
    inputs = default_inputs(name)
    inputs["h5ad"] = Staged("s1.h5ad")
    with pytest.raises(ModuleError, match="task.ext.prefix"):
        render_section(mod.script, context(mod, meta_id="s1", inputs=inputs))


@pytest.mark.parametrize("name", MODULES)
def test_container_and_conda_follow_the_engine_and_task_accelerator(name):
    mod = module(name)
    container = mod.directive("container")
    conda = mod.directive("conda")
    assert "workflow.containerEngine" in container
    assert "task.ext.singularity_pull_docker_container" in container
    for engine in ("docker", "podman", "singularity", "apptainer", None):
        for accelerator in (None, 1):
            for pull_docker in (None, True):
                ctx = context(
                    mod,
                    meta_id="s1",
                    inputs=default_inputs(name),
                    accelerator=accelerator,
                    container_engine=engine,
                    singularity_pull_docker_container=pull_docker,
                    module_dir="/m",
                )
                image = render_string(container, ctx)
                sif = engine in ("singularity", "apptainer") and not pull_docker
                # every module switches on task.accelerator; train's CPU image has CPU torch
                cpu_image, cpu_sif = (TRAIN_CPU_IMAGE, TRAIN_CPU_SIF) if name == "train" else (CPU_IMAGE, CPU_SIF)
                expected = (CUDA_SIF if accelerator else cpu_sif) if sif else (CUDA_IMAGE if accelerator else cpu_image)
                assert image == expected, (engine, accelerator, pull_docker)
                if not sif:
                    assert re.search(r":([A-Za-z\d\-_.]+)$", image), "docker tag parseable by nf-core lint"
                env = render_string(conda, ctx)
                assert env == ("/m/environment.gpu.yml" if accelerator else "/m/environment.yml")


@pytest.mark.parametrize("name", MODULES)
def test_versions_are_emitted_one_per_tool_on_the_versions_topic(name):
    mod = module(name)
    version_outputs = [out for out in mod.outputs if (out.emit or "").startswith("versions")]
    others = [out for out in mod.outputs if out not in version_outputs]
    assert sum(out.topic == "versions" for out in mod.outputs) == len(version_outputs)
    for out in version_outputs:
        assert out.topic == "versions"
        assert re.fullmatch(r"versions_\w+", out.emit)
        assert re.search(r'tuple\s+val\("\${\s*task\.process\s*}"\),\s*val\(.*\),\s*(?:eval|val)\(.*\)', out.line)
    evals = eval_commands(mod)
    assert evals["versions_scrcl"] == "scrcl-cli --version"
    assert "torch.version.cuda" in evals["versions_cuda"], "the CUDA runtime is recorded for the GPU path"
    for out in others:
        assert out.emit, f"every output has an emit: {out.line}"
        assert out.elements[0] == ("val", "meta"), f"outputs carry meta: {out.line}"


@pytest.mark.parametrize("name", MODULES)
def test_meta_yml_is_schema_shaped_and_matches_main_nf(name):
    mod = module(name)
    meta = meta_yml(name)
    for key in ("name", "description", "keywords", "authors", "maintainers", "tools", "input", "output", "topics"):
        assert meta.get(key), f"meta.yml needs '{key}'"
    assert meta["name"].upper() == mod.name
    assert len(meta["keywords"]) >= 3
    assert len(set(meta["keywords"])) == len(meta["keywords"])
    for tool in meta["tools"]:
        ((tool_name, info),) = tool.items()
        assert tool_name == "scrcl-cli"
        assert info["description"]
        assert isinstance(info["licence"], list)
        assert info["licence"]
        assert "identifier" in info
        assert any(info.get(k) for k in ("homepage", "documentation", "tool_dev_url", "doi"))

    # inputs: tuple -> list of single-key dicts, single -> dict
    meta_inputs = [
        [next(iter(e)) for e in channel] if isinstance(channel, list) else next(iter(channel))
        for channel in meta["input"]
    ]
    nf_inputs = []
    for line in mod.inputs:
        names = re.findall(r"\b(?:val|path)\((\w+)\)", line)
        nf_inputs.append(names if line.startswith("tuple") else names[0])
    assert meta_inputs == nf_inputs

    # outputs: emit -> [[element names]] in main.nf order
    nf_outputs = {out.emit: [element_name(kw, arg) for kw, arg in out.elements] for out in mod.outputs}
    meta_outputs = {emit: [next(iter(e)) for e in channels[0]] for emit, channels in meta["output"].items()}
    assert list(meta_outputs) == list(nf_outputs)
    assert meta_outputs == nf_outputs
    for channels in meta["output"].values():
        assert len(channels) == 1

    # topics: the versions tuples, in order
    nf_topic = [[element_name(kw, arg) for kw, arg in out.elements] for out in mod.outputs if out.topic == "versions"]
    meta_topic = [[next(iter(e)) for e in channel] for channel in meta["topics"]["versions"]]
    assert meta_topic == nf_topic
    assert set(meta["topics"]) == {"versions"}

    # every element: type and description; h5ad files carry the EDAM HDF5 format
    elements = [e for ch in meta["input"] for e in (ch if isinstance(ch, list) else [ch])]
    elements += [e for chs in meta["output"].values() for e in chs[0]]
    elements += [e for ch in meta["topics"]["versions"] for e in ch]
    for element in elements:
        ((key, info),) = element.items()
        assert info.get("type") in ALLOWED_TYPES, (key, info)
        assert info.get("description"), key
        if info["type"] in ("file", "directory"):
            assert info.get("pattern"), f"{key} needs a pattern"
        if str(key).endswith("h5ad"):
            assert {"edam": EDAM_HDF5} in info.get("ontologies", []), f"{key} needs EDAM format_3590"
        for onto in info.get("ontologies", []):
            assert next(iter(onto.values())).startswith("http://edamontology.org/format_")
    if name == "train":
        assert TRAIN_CPU_IMAGE in meta["description"], "meta.yml names the CPU training image"
        assert CUDA_IMAGE in meta["description"]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("env_file", ["environment.yml", "environment.gpu.yml"])
def test_environment_files_are_pinned_and_sorted(name, env_file):
    path = MODULE_ROOT / name / env_file
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == "---\n"
    assert lines[1].startswith("# yaml-language-server: $schema=")
    env = yaml.safe_load(path.read_text())
    assert env["channels"] == ["conda-forge", "bioconda"]
    deps = env["dependencies"]
    plain = [d for d in deps if isinstance(d, str)]
    dicts = [d for d in deps if isinstance(d, dict)]
    for dep in plain:
        assert re.fullmatch(r"[\w-]+::[\w.-]+=[\w.]+", dep), f"pin channel and version, no build: {dep}"
    for block in dicts:
        for spec in block["pip"]:
            assert re.fullmatch(r"[\w.-]+(\[[\w,]+\])?==[\w.]+", spec), f"pin pip packages with ==: {spec}"
    # nf-core lint's order: conda packages sorted (pip last), then the dict blocks
    def key(d):
        return (1 if str(d).startswith("pip=") or str(d) == "pip" else 0, str(d))
    assert deps == sorted(plain, key=key) + sorted(dicts, key=str)
    pip_specs = [spec for block in dicts for spec in block["pip"]]
    assert any(spec.startswith("scrcl-cli") for spec in pip_specs)
    if env_file == "environment.gpu.yml":
        assert any("gpu" in spec for spec in pip_specs), "the GPU environment brings onnxruntime-gpu"


def _nf_test_blocks(text: str) -> list[tuple[str, str]]:
    """(name, body) of each test("...") block."""
    starts = [(m.group(1), m.end()) for m in re.finditer(r'^\s*test\("([^"]+)"\)\s*\{', text, re.MULTILINE)]
    blocks = []
    for i, (name, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else len(text)
        blocks.append((name, text[start:end]))
    return blocks


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("variant", ["main.nf.test", "main.gpu.nf.test"])
def test_nf_test_files_have_tags_real_and_stub_tests(name, variant):
    tests_dir = MODULE_ROOT / name / "tests"
    text = (tests_dir / variant).read_text()
    process = f"SCRCL_{name.upper()}"
    assert 'script "../main.nf"' in text
    assert f'process "{process}"' in text
    config = re.search(r'^\s*config\s+"([^"]+)"', text, re.MULTILINE).group(1)
    assert (tests_dir / config).is_file()
    tags = re.findall(r'^\s*tag\s+"([^"]+)"', text, re.MULTILINE)
    expected = {"modules", "modules_scrcl", "scrcl", f"scrcl/{name}"}  # nf-core lint: modules_<org_path>
    chained = {f"scrcl/{m}" for m in re.findall(r'script\s+"\.\./\.\./(\w+)/main\.nf"', text)}
    assert expected | chained <= set(tags), f"tags {tags}"
    for m in re.findall(r'script\s+"(\.\./\.\./\w+/main\.nf)"', text):
        assert (tests_dir / m).resolve().is_file()
    blocks = _nf_test_blocks(text)
    stubs = [b for b in blocks if b[0].endswith(" - stub")]
    reals = [b for b in blocks if not b[0].endswith(" - stub")]
    assert stubs, "a '- stub' test is mandatory"
    assert reals, "a real test runs the tool"
    for test_name, body in blocks:
        assert test_name.startswith("Should "), "test names read as sentences"
        assert ('options "-stub"' in body) == test_name.endswith(" - stub")
        if "process.success" in body:
            assert "snapshot(" in body, f"{test_name}: one snapshot per test"
            assert "versions" in body, f"{test_name}: the snapshot includes the versions"
        assert "md5" not in body, "stochastic outputs: snapshot names, not checksums"
        for dataset in re.findall(r"scrcl_test_data \+ '/([\w.]+)'", body):
            assert (PACKAGED_DATA / dataset).is_file(), f"{test_name} reads {dataset}, which scrcl-cli does not package"
    if variant == "main.gpu.nf.test":
        assert "gpu" in tags
        gpu_config = (tests_dir / config).read_text()
        assert re.search(rf"withName:\s*'{process}'\s*\{{[^}}]*accelerator\s*=\s*1", gpu_config)
        assert "--gpus all" in gpu_config
        assert "--nv" in gpu_config
        assert "versions_cuda[0][2] != 'cpu'" in text, "the GPU test proves the CUDA image ran"
    else:
        assert "gpu" not in tags


# ============================================================================ stub runs


def _stage(workdir: Path, name: str, target: Path) -> Staged:
    """Stage an input the way Nextflow does: a symlink in the task folder."""
    (workdir / name).symlink_to(target)
    return Staged(name)


def _check_declared_outputs(mod: Module, rendered, base_ctx: dict, workdir: Path) -> dict[str, list[Path]]:
    out_ctx = output_context(mod, rendered, base_ctx)
    found: dict[str, list[Path]] = {}
    for emit, patterns in declared_paths(mod, out_ctx).items():
        found[emit] = []
        for pattern in patterns:
            matches = sorted(workdir.glob(pattern))
            assert matches, f"{mod.name}: declared output {emit} ({pattern}) was not created"
            found[emit] += matches
    return found


@pytest.mark.parametrize("name", MODULES)
def test_stub_creates_every_declared_output(name, tmp_path):
    mod = module(name)
    src = tmp_path / "src"
    (src / "reference_model").mkdir(parents=True)
    (src / "input.h5ad").touch()
    work = tmp_path / "work"
    work.mkdir()
    inputs = {"h5ad": _stage(work, "stub_input.h5ad", src / "input.h5ad")}
    if name != "train":
        inputs["model"] = _stage(work, "reference_model", src / "reference_model")
    ctx = context(mod, meta_id="stubby", inputs=inputs, args="--epochs 1")
    rendered = render_section(mod.stub, ctx)
    result = run_bash_script(rendered.script, work, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    found = _check_declared_outputs(mod, rendered, ctx, work)
    if name == "train":
        (model_dir,) = found["model"]
        assert sorted(p.name for p in model_dir.iterdir()) == sorted(MODEL_FILES)


# ============================================================================ real runs


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory):
    """PATH with scrcl-cli and a `python3` that has its packages, as in the images."""
    exe = shutil.which("scrcl-cli")
    if exe is None:
        pytest.skip("scrcl-cli is not on PATH: pip install -e . (with the train and cpu extras)")
    bin_dir = tmp_path_factory.mktemp("bin")
    # A wrapper that execs this interpreter: a symlink to a virtualenv's python resolves to the base
    # interpreter's path and loses the venv's site-packages.
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _load_make_test_data():
    spec = importlib.util.spec_from_file_location("make_test_data", NEXTFLOW / "assets" / "make_test_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def split_data(tmp_path_factory):
    """The pipeline's test data (assets/make_test_data.py), made from the packaged example by default."""
    outdir = tmp_path_factory.mktemp("test_data")
    make = _load_make_test_data()
    assert make.default_source() == PACKAGED_DATA / PBMC
    written = make.make_test_data(make.default_source(), outdir, seed=0)
    return outdir, written


class TaskRun:
    """One rendered module task run in its own folder."""

    def __init__(self, mod, rendered, ctx, workdir, result):
        self.mod, self.rendered, self.ctx, self.workdir, self.result = mod, rendered, ctx, workdir, result

    def outputs(self) -> dict[str, list[Path]]:
        assert self.result.returncode == 0, f"{self.mod.name} failed:\n{self.result.stderr[-3000:]}"
        return _check_declared_outputs(self.mod, self.rendered, self.ctx, self.workdir)


def run_task(
    name: str, workdir: Path, env: dict, *, meta_id: str, h5ad: Path, model: Path | None, args: str, prefix: str | None = None
) -> TaskRun:
    mod = module(name)
    workdir.mkdir(parents=True)
    inputs = {"h5ad": _stage(workdir, h5ad.name, h5ad)}
    if model is not None:
        inputs["model"] = _stage(workdir, model.name, model)
    ctx = context(mod, meta_id=meta_id, inputs=inputs, args=args, prefix=prefix, cpus=2)
    rendered = render_section(mod.script, ctx)
    result = run_bash_script(rendered.script, workdir, env=env)
    return TaskRun(mod, rendered, ctx, workdir, result)


@pytest.fixture(scope="session")
def trained(cli_env, tmp_path_factory):
    """SCRCL_TRAIN's script on pbmc68k_reduced_700.h5ad with the nf-test's ext.args."""
    return run_task(
        "train",
        tmp_path_factory.mktemp("train") / "task",
        cli_env,
        meta_id="pbmc700",
        h5ad=PACKAGED_DATA / PBMC,
        model=None,
        args=nf_test_args("train", "SCRCL_TRAIN"),
    )


@pytest.fixture(scope="session")
def inferred(cli_env, trained, split_data, tmp_path_factory):
    """SCRCL_EMBED and SCRCL_CLUSTER's scripts on query quarters of the pipeline's test data,
    with the trained model and the pipeline's ext.prefix (the sample ids equal the file stems)."""
    (model_dir,) = trained.outputs()["model"]
    _, written = split_data
    runs = {}
    for name, sample in (("embed", "pbmc_query_a"), ("cluster", "pbmc_query_b")):
        runs[name] = run_task(
            name,
            tmp_path_factory.mktemp(name) / "task",
            cli_env,
            meta_id=sample,
            h5ad=written[sample],
            model=model_dir,
            args=nf_test_args(name, f"SCRCL_{name.upper()}"),
            prefix=f"{sample}.scrcl",
        )
    return runs


@pytest.fixture(scope="session")
def eval_results(cli_env, tmp_path_factory):
    """Each distinct versions eval command, run once the way Nextflow runs it."""
    cache = {}
    workdir = tmp_path_factory.mktemp("eval")

    def run(command: str):
        if command not in cache:
            cache[command] = run_eval(command, workdir, cli_env)
        return cache[command]

    return run


def _task(name, trained, inferred) -> TaskRun:
    return trained if name == "train" else inferred[name]


@pytest.mark.parametrize("name", MODULES)
def test_script_with_the_real_cli_creates_every_declared_output(name, request):
    trained = request.getfixturevalue("trained")
    inferred = request.getfixturevalue("inferred") if name != "train" else None
    run = _task(name, trained, inferred)
    found = run.outputs()
    ad = pytest.importorskip("anndata")
    (h5ad,) = found["h5ad"]
    adata = ad.read_h5ad(h5ad)
    assert "X_scrcl" in adata.obsm
    if name == "train":
        (model_dir,) = found["model"]
        assert set(MODEL_FILES) <= {p.name for p in model_dir.iterdir()}
        assert adata.n_obs == 700
        assert "scrcl_cluster" in adata.obs
    if name == "embed":
        (table,) = found["csv"]
        with open(table) as fh:
            rows = list(csv.reader(fh))
        assert len(rows) == adata.n_obs + 1
        assert len(rows[1]) == adata.obsm["X_scrcl"].shape[1] + 1
    if name == "cluster":
        assert "scrcl_cluster" in adata.obs
        (markers,) = found["markers"]
        with open(markers) as fh:
            assert len(list(csv.reader(fh))) > 1


@pytest.mark.parametrize("name", MODULES)
def test_versions_eval_commands_print_versions(name, cli_env, eval_results):
    mod = module(name)
    for emit, command in eval_commands(mod).items():
        result = eval_results(command)
        assert result.returncode == 0, f"{emit}: {command!r} failed: {result.stderr}"
        value = result.stdout.strip()
        if emit == "versions_cuda":
            assert value == "cpu" or re.fullmatch(r"\d+\.\d+", value), f"{emit}: {value!r}"
        else:
            assert VERSION.fullmatch(value), f"{emit}: {command!r} printed {value!r}"
    import scrcl_cli

    assert eval_results("scrcl-cli --version").stdout.strip() == scrcl_cli.__version__


def _nf_test_failure(name: str) -> tuple[str, str, str]:
    """(input file, params.module_args, expected errorReport text) of the module's failure test."""
    text = (MODULE_ROOT / name / "tests" / "main.nf.test").read_text()
    failing = [body for test_name, body in _nf_test_blocks(text) if "process.failed" in body]
    assert len(failing) == 1, f"{name}/tests/main.nf.test needs one failure test"
    body = failing[0].split("then {")[0].split("when {")[1]  # the tested process's inputs, not the setup's
    dataset = re.search(r"scrcl_test_data \+ '/([\w.]+)'", body)
    module_args = re.search(r"module_args\s*=\s*'([^']*)'", body)
    report = re.search(r"process\.errorReport\.contains\('([^']+)'\)", failing[0])
    assert dataset and module_args and report, f"{name}: failure test without input, module_args or error text"
    return dataset.group(1), module_args.group(1), report.group(1)


def test_train_script_fails_as_its_nf_test_expects(cli_env, tmp_path):
    dataset, module_args, report = _nf_test_failure("train")
    run = run_task(
        "train",
        tmp_path / "task",
        cli_env,
        meta_id="pbmc700",
        h5ad=PACKAGED_DATA / dataset,
        model=None,
        args=nf_test_args("train", "SCRCL_TRAIN", module_args=module_args),
    )
    assert module_args in run.rendered.script
    assert run.result.returncode == 1
    assert report in run.result.stderr
    assert "Traceback" not in run.result.stderr


@pytest.mark.parametrize("name", ["embed", "cluster"])
def test_inference_script_fails_as_its_nf_test_expects(name, trained, tmp_path, cli_env):
    (model_dir,) = trained.outputs()["model"]
    dataset, module_args, report = _nf_test_failure(name)
    run = run_task(
        name,
        tmp_path / "task",
        cli_env,
        meta_id="pbmc700",
        h5ad=PACKAGED_DATA / dataset,
        model=model_dir,
        args=nf_test_args(name, f"SCRCL_{name.upper()}", module_args=module_args),
        prefix="pbmc700.scrcl",
    )
    assert module_args in run.rendered.script
    assert run.result.returncode == 1
    assert report in run.result.stderr
    assert "Traceback" not in run.result.stderr


# ============================================================================ pipeline


def test_pipeline_includes_the_three_modules():
    text = (NEXTFLOW / "main.nf").read_text()
    includes = dict(re.findall(r"include\s*\{\s*(\w+)\s*\}\s*from\s*'([^']+)'", text))
    assert set(includes) == {"SCRCL_TRAIN", "SCRCL_EMBED", "SCRCL_CLUSTER"}
    for process, rel in includes.items():
        path = (NEXTFLOW / f"{rel}.nf").resolve()
        assert path.is_file()
        assert parse_module(path).name == process
    assert "channel.topic('versions')" in text
    assert ".first()" in text, "the model is a value channel, reused by every query task"


def test_pipeline_config_defines_profiles_gpu_switch_and_distinct_prefixes():
    config = (NEXTFLOW / "nextflow.config").read_text()
    profiles = config[config.index("profiles {") :]
    for profile in ("docker", "singularity", "apptainer", "conda", "gpu", "test"):
        assert re.search(rf"^\s*{profile}\s*\{{", profiles, re.MULTILINE), f"profile {profile}"
    gpu = re.search(r"^\s*gpu\s*\{(.*?)^\s*\}", profiles, re.MULTILINE | re.DOTALL).group(1)
    assert "--gpus all" in gpu
    assert "--nv" in gpu
    for include in re.findall(r"includeConfig\s+'([^']+)'", config):
        assert (NEXTFLOW / include).is_file(), include
    base = (NEXTFLOW / "conf" / "base.config").read_text()
    gpu_label = re.search(r"withLabel:\s*'process_gpu'\s*\{(.*?)\}", base, re.DOTALL).group(1)
    assert "accelerator" in gpu_label
    assert "'gpu'" in gpu_label
    for label in ("process_low", "process_medium"):
        assert f"withLabel: '{label}'" in base
    modules_config = (NEXTFLOW / "conf" / "modules.config").read_text()
    for name in MODULES:
        block = re.search(rf"withName:\s*'SCRCL_{name.upper()}'\s*\{{(.*?)\n    \}}", modules_config, re.DOTALL).group(1)
        prefix = re.search(r"ext\.prefix\s*=\s*\{\s*\"([^\"]+)\"\s*\}", block).group(1)
        assert prefix != "${meta.id}", "a prefix unlike the input name, so outputs never overwrite inputs"
        assert "publishDir" in block
    test_config = (NEXTFLOW / "conf" / "test.config").read_text()
    assert '"${projectDir}/assets/samplesheet_test.csv"' in test_config
    assert nf_test_args("train", "SCRCL_TRAIN") in test_config, "-profile test trains as briefly as the module tests"


def _validate_rows(rows: list[dict], schema: dict) -> None:
    """The subset of JSON schema that assets/schema_input.json uses."""
    props = schema["items"]["properties"]
    for row in rows:
        assert set(schema["items"]["required"]) <= set(row)
        assert set(row) == set(props)
        for key, rule in props.items():
            if "pattern" in rule:
                assert re.search(rule["pattern"], row[key]), (key, row[key])
            if "enum" in rule:
                assert row[key] in rule["enum"], (key, row[key])
    for key in schema.get("uniqueEntries", []):
        values = [row[key] for row in rows]
        assert len(values) == len(set(values))


def test_test_samplesheet_follows_the_schema_and_make_test_data_writes_its_files(split_data):
    schema = json.loads((NEXTFLOW / "assets" / "schema_input.json").read_text())
    sheet = NEXTFLOW / "assets" / "samplesheet_test.csv"
    with open(sheet, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["sample", "h5ad", "role"]
        rows = list(reader)
    _validate_rows(rows, schema)
    roles = [row["role"] for row in rows]
    assert roles.count("reference") == 1
    assert roles.count("query") >= 1
    outdir, written = split_data
    for row in rows:
        path = Path(row["h5ad"])
        assert not path.is_absolute()
        assert path.parent == Path("test_data"), "made by make_test_data.py into assets/test_data/"
        assert written[row["sample"]].name == path.name
    with open(outdir / "samplesheet.csv", newline="") as fh:
        generated = list(csv.DictReader(fh))
    _validate_rows(generated, schema)
    assert [(r["sample"], r["role"]) for r in generated] == [(r["sample"], r["role"]) for r in rows]
    ad = pytest.importorskip("anndata")
    parts = {name: ad.read_h5ad(path) for name, path in written.items()}
    assert sum(a.n_obs for a in parts.values()) == 700
    names = [set(a.obs_names) for a in parts.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert all(list(a.var_names) == list(parts["pbmc_reference"].var_names) for a in parts.values())


def test_readme_explains_nf_test_and_the_test_profile():
    readme = (NEXTFLOW / "README.md").read_text()
    assert "## Use in Nextflow" in readme
    assert "nf-test test modules/scrcl/scrcl/" in readme
    assert "nextflow run nextflow/ -profile test,docker" in readme
    assert "make_test_data.py" in readme
    for name in MODULES:
        assert f"SCRCL_{name.upper()}" in readme


@pytest.mark.parametrize(("module", "env_file"), [(m, f) for m in MODULES for f in ("environment.yml", "environment.gpu.yml")])
def test_environment_files_pin_the_image_locks(module, env_file):
    """Each environment equals what nextflow/pin_environments.py writes from the image's lock file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pin_environments", NEXTFLOW / "pin_environments.py")
    pin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pin)
    flavour, extras, purpose = pin.ENVIRONMENTS[(module, env_file)]
    assert (MODULE_ROOT / module / env_file).read_text() == pin.render(flavour, extras, purpose), (
        "run python nextflow/pin_environments.py after containers/lock.sh")
    env = yaml.safe_load((MODULE_ROOT / module / env_file).read_text())
    pins = {p.split("==")[0].split("[")[0].lower() for p in env["dependencies"][-1]["pip"]}
    assert "conda-forge::python=3.11" in env["dependencies"]  # the images' Python
    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+ (tomllib)")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"]:
        assert Requirement(dep).name.lower().replace("_", "-") in {p.replace("_", "-") for p in pins}, dep
