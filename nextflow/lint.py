#!/usr/bin/env python3
"""Run ``nf-core modules lint`` on modules/scrcl/scrcl/* offline; fail only on unexpected failures.

    pip install nf-core==4.2.1            # in a virtualenv of its own (NFCORE_VERSION)
    python nextflow/lint.py               # exit 1 on a failure not listed in nextflow/lint_expected.yml
    python nextflow/lint.py --schemas DIR --json lint.json

nf-core tools assumes network access and a Nextflow install; this script removes both needs:

* nf-core tools clones the modules repository named by ``--git-remote`` only to read its
  ``.nf-core.yml`` and ``modules/{meta,environment}-schema.json``. The script builds that
  repository in a temporary folder: this repository's ``.nf-core.yml`` plus the two schemas from
  ``--schemas DIR`` (``DIR/modules/*-schema.json``, e.g. a checkout of nf-core/modules). Without
  ``--schemas`` it puts permissive stand-ins there, so every other meta.yml and environment.yml
  check still runs, and reports ``meta_yml_valid`` and ``environment_yml_valid`` as not checked.
* ``nextflow config`` (nf-core tools reads ``docker.registry`` from it) is answered by a
  stand-in ``nextflow`` that prints an empty config, and ``nextflow -v`` by a version too old
  for ``nextflow inspect``, with which nf-core tools 4 resolves each module's containers: the
  container checks then fail as "Unable to resolve" (expected, see lint_expected.yml).
* HTTP is switched off inside the lint: the container URL checks fail the same way as they do
  for images that are not published yet, and nothing waits on a registry.
* nf-core's caches and settings go to the temporary folder, not to ``~``.

The lint results are compared with ``nextflow/lint_expected.yml`` (module, test, why). Warnings
are printed, never fatal. Expected failures that no longer occur are printed as stale.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = Path(__file__).resolve().parent / "lint_expected.yml"
MODULES = ["scrcl/train", "scrcl/embed", "scrcl/cluster"]
# the nf-core tools release lint_expected.yml was written for (the CI installs it)
NFCORE_VERSION = "4.2.1"
SCHEMAS = ["meta-schema.json", "environment-schema.json"]
# results that only mean something against nf-core's real schemas
SCHEMA_TESTS = {"meta_yml_valid": "meta-schema.json", "environment_yml_valid": "environment-schema.json"}

log = logging.getLogger("nextflow.lint")


@dataclass(frozen=True)
class Result:
    """One lint result: the module (``scrcl/train``), the test key and nf-core's message."""

    module: str
    test: str
    message: str
    file: str


@dataclass(frozen=True)
class Expected:
    module: str
    test: str
    why: str


def load_expected(path: Path = EXPECTED) -> list[Expected]:
    entries = yaml.safe_load(path.read_text())["expected_failures"]
    return [Expected(e["module"], e["test"], e["why"]) for e in entries]


def classify(failed: list[Result], expected: list[Expected]) -> tuple[list[Result], list[Expected]]:
    """(unexpected failures, stale expectations): a failure is expected when its module (or '*')
    and test key are listed; an expectation is stale when no failure matches it."""

    def matches(r: Result, e: Expected) -> bool:
        return e.test == r.test and e.module in ("*", r.module)

    unexpected = [r for r in failed if not any(matches(r, e) for e in expected)]
    stale = [e for e in expected if not any(matches(r, e) for r in failed)]
    return unexpected, stale


def _git(cwd: Path, *args: str) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="lint", GIT_AUTHOR_EMAIL="lint@localhost",
               GIT_COMMITTER_NAME="lint", GIT_COMMITTER_EMAIL="lint@localhost")
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def make_remote(tmp: Path, schemas: Path | None, root: Path = ROOT) -> str:
    """A local modules repository for --git-remote: .nf-core.yml, modules/<org>/, the schemas."""
    work = tmp / "remote-src"
    org = yaml.safe_load((root / ".nf-core.yml").read_text())["org_path"]
    (work / "modules" / org).mkdir(parents=True)
    shutil.copy(root / ".nf-core.yml", work / ".nf-core.yml")
    (work / "modules" / org / ".keep").touch()
    for name in SCHEMAS:
        target = work / "modules" / name
        if schemas is not None:
            shutil.copy(schemas / "modules" / name, target)
        else:
            target.write_text("{}\n")  # accepts anything: reported as not checked
    _git(work, "init", "-q", "-b", "main")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "lint remote")
    bare = tmp / "remote" / "scrcl-modules.git"
    _git(tmp, "clone", "-q", "--bare", str(work), str(bare))
    return f"file://{bare}"


def _offline_environment(tmp: Path) -> None:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nextflow"
    # `config`: an empty config. `-v`: a version too old for `nextflow inspect`, so nf-core tools
    # does not try to resolve the containers with it. Anything else fails.
    fake.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  config) case "$*" in *json*) echo "{}" ;; esac; exit 0 ;;\n'
        "  -v|-version|--version) echo 'nextflow version 0.0.0' ; exit 0 ;;\n"
        "esac\n"
        'echo "no Nextflow here (nextflow/lint.py): $*" >&2\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_CACHE_HOME", "cache"), ("NXF_HOME", "nxf")):
        os.environ[var] = str(tmp / sub)
        (tmp / sub).mkdir()
    os.environ["HIDE_PROGRESS"] = "1"


def _no_http() -> list[str]:
    """Make every HTTP request fail at once; return the list the refused URLs are appended to."""
    import requests
    import requests.adapters

    refused: list[str] = []

    def send(self, request, *args, **kwargs):
        refused.append(request.url)
        raise requests.exceptions.ConnectionError(f"HTTP is off in nextflow/lint.py: {request.url}")

    requests.adapters.HTTPAdapter.send = send  # type: ignore[method-assign]
    return refused


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_lint(schemas: Path | None, modules: list[str], root: Path = ROOT) -> tuple[dict[str, list[Result]], list[str]]:
    """Lint the modules; return {'passed'|'warned'|'failed'|'not_checked': results} and refused URLs.

    nf-core lint rewrites some files it finds wanting (an unsorted environment.yml), so it lints
    a copy of modules/ and .nf-core.yml; a file it changed is reported as a failure of its own."""
    with tempfile.TemporaryDirectory(prefix="nfcore-lint-") as tmp_name:
        tmp = Path(tmp_name)
        _offline_environment(tmp)
        remote = make_remote(tmp, schemas, root)
        repo = tmp / "repo"
        shutil.copytree(root / "modules", repo / "modules")
        shutil.copy(root / ".nf-core.yml", repo / ".nf-core.yml")
        _git(repo, "init", "-q")  # nf-core tools looks for the git root
        before = _snapshot(repo / "modules")
        refused = _no_http()
        # imported after the environment is set: nf-core reads XDG_* at import time
        from nf_core.modules.lint import ModuleLint

        results: dict[str, list[Result]] = {"passed": [], "warned": [], "failed": [], "not_checked": []}
        for module in modules:
            lint = ModuleLint(directory=repo, remote_url=remote, hide_progress=True)
            lint.lint(module=module, print_results=False)
            for kind in ("passed", "warned", "failed"):
                for r in getattr(lint, kind):
                    path = Path(r.file_path)
                    res = Result(r.component_name, r.lint_test, str(r.message),
                                 str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path))
                    if schemas is None and res.test in SCHEMA_TESTS:
                        results["not_checked"].append(res)
                    else:
                        results[kind].append(res)
        after = _snapshot(repo / "modules")
        for rel in sorted(set(before) | set(after)):
            if before.get(rel) != after.get(rel):
                module = "/".join(Path(rel).parts[1:3])
                results["failed"].append(Result(module, "lint_rewrote_file", "nf-core lint rewrote this file", f"modules/{rel}"))
    return results, refused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=Path, help="folder with modules/meta-schema.json and modules/environment-schema.json")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--expected", type=Path, default=EXPECTED)
    parser.add_argument("--root", type=Path, default=ROOT, help="the modules repository (default: this one)")
    parser.add_argument("modules", nargs="*", default=MODULES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # nf-core logs each config it cannot read and each container it cannot resolve; the results say it
    logging.getLogger("nf_core").setLevel(logging.ERROR)
    if args.schemas is not None and not all((args.schemas / "modules" / n).is_file() for n in SCHEMAS):
        print(f"error: {args.schemas}/modules/ lacks {' or '.join(SCHEMAS)}", file=sys.stderr)
        return 2

    results, refused = run_lint(args.schemas, args.modules, args.root.resolve())
    expected = [e for e in load_expected(args.expected) if e.module == "*" or e.module in args.modules]
    unexpected, stale = classify(results["failed"], expected)
    counts = {k: len(v) for k, v in results.items()}
    print("nf-core modules lint (nf-core " + _nfcore_version() + "): "
          + ", ".join(f"{n} {k}" for k, n in counts.items()))
    if _nfcore_version() != NFCORE_VERSION:
        print(f"  note: {args.expected.name} was written for nf-core {NFCORE_VERSION}")
    for r in results["warned"]:
        print(f"  warned  {r.module:14} {r.test}: {r.message}")
    for r in results["failed"]:
        mark = "UNEXPECTED" if r in unexpected else "expected"
        print(f"  {mark:10} {r.module:14} {r.test}: {r.message}")
    for r in results["not_checked"]:
        print(f"  not checked {r.module:14} {r.test}: needs nf-core's {SCHEMA_TESTS[r.test]} (--schemas)")
    for e in stale:
        print(f"  stale expectation (passes now, remove it from {args.expected.name}): {e.module} {e.test}")
    if refused:
        print(f"  HTTP refused {len(refused)} time(s), e.g. {refused[0]}")
    if args.json:
        args.json.write_text(json.dumps({k: [asdict(r) for r in v] for k, v in results.items()}
                                        | {"unexpected": [asdict(r) for r in unexpected]}, indent=1) + "\n")
    if unexpected:
        print(f"{len(unexpected)} unexpected lint failure(s)", file=sys.stderr)
        return 1
    return 0


def _nfcore_version() -> str:
    from importlib.metadata import version

    return version("nf-core")


if __name__ == "__main__":
    sys.exit(main())
