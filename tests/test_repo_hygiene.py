"""The repository speaks of the product only: no diary words and no paths of one machine.

Every tracked text file is read. Diary words are the vocabulary of how work was organised
(numbered work periods, lent machines, tracker numbers); "session" alone is allowed because ONNX
Runtime's API is made of sessions. Machine paths are absolute folders of one computer; folders
inside a container image are allowed where an image defines them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DIARY = re.compile(
    r"\bsessions? \d|\bsession-\d|\b(this|previous|next|earlier|last) session\b|\bloans?\b|\blease\b|\blent\b"
    r"|\bissues? #?\d+|\bborrowed\b|\bround \d+\b|method doc",
    re.IGNORECASE,
)
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/tmp/[A-Za-z]|/root/|/home/[a-z])")
# Paths inside images (their own /tmp) and the repository's own ignore rules.
PATH_ALLOWED = {"containers/Dockerfile", "containers/Dockerfile.cuda", "containers/scrcl.def", ".gitignore",
                "tests/test_containers.py", "tests/test_repo_hygiene.py"}
DIARY_ALLOWED = {"tests/test_repo_hygiene.py"}
TEXT = (".py", ".md", ".sh", ".toml", ".yml", ".yaml", ".nf", ".config", ".def", ".txt", ".in", ".cfg", ".json",
        ".test", ".snap", "Dockerfile", "Dockerfile.cuda", ".gitignore", "run")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an unpacked sdist): nothing to check")
    return [f for f in out.splitlines() if f.endswith(TEXT) and (ROOT / f).is_file()]


def _hits(pattern: re.Pattern[str], allowed: set[str]) -> list[str]:
    found = []
    for name in _tracked():
        if name in allowed:
            continue
        for i, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            m = pattern.search(line)
            if m:
                found.append(f"{name}:{i}: {m.group(0)!r}")
    return found


def test_no_diary_words():
    hits = _hits(DIARY, DIARY_ALLOWED)
    assert not hits, "diary words in tracked files:\n" + "\n".join(hits[:40])


def test_no_machine_paths():
    hits = _hits(MACHINE_PATH, PATH_ALLOWED)
    assert not hits, "machine-specific paths in tracked files:\n" + "\n".join(hits[:40])


# Documentation states the current truth: no section points at a newer one that replaces it, and
# sections are cited by name (numbers change whenever a page is reorganised).
STALE_DOCS = re.compile(r"superseded by|§\s*\d", re.IGNORECASE)


def test_docs_state_current_truth():
    pages = [f for f in _tracked() if f.endswith(".md") and (f.startswith("docs/") or "/" not in f)]
    assert "docs/benchmarks.md" in pages, "the check must read the docs pages"
    found = []
    for name in pages:
        for i, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            m = STALE_DOCS.search(line)
            if m:
                found.append(f"{name}:{i}: {m.group(0)!r}")
    assert not found, "superseded sections or numbered section references in docs:\n" + "\n".join(found[:40])


def test_docs_cited_by_section_name():
    """Code, scripts and pages cite a docs page's section by its name, never by a number."""
    hits = _hits(re.compile(r"\.md,?\s*§"), {"tests/test_repo_hygiene.py"})
    assert not hits, "docs cited by section number:\n" + "\n".join(hits[:40])
