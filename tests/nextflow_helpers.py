"""Read nf-core style ``main.nf`` modules and render their Groovy parts without Nextflow.

Nextflow cannot be installed on the development machines, so ``tests/test_nextflow_modules.py``
checks the modules offline: it splits each ``main.nf`` into its sections (the same line-based
way ``nf-core modules lint`` does), evaluates the directives and the ``script:``/``stub:``
statements with test values, and renders the triple-quoted command into a bash script.

Only the Groovy the modules use is understood, and anything else raises ``GroovyError``, so
a module change that this renderer cannot follow fails the tests instead of being skipped:

* expressions: string literals ('...', "..." with ``$x.y`` / ``${expr}``), ``null``,
  ``true``/``false``, integers, lists ``[a, b]``, names and property paths (``task.ext.args``),
  ``!``, ``==``, ``!=``, ``in``, ``&&``, ``||``, ``a ?: b``, ``a ? b : c``, parentheses;
* statements: ``def x = expr``, ``x = expr``, ``if (expr) { error(...) }``.

As in Nextflow, variables assigned without ``def`` in ``script:`` are visible to the
``output:`` block and ``def`` variables are not.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STANDARD_LABELS = (
    "process_single",
    "process_low",
    "process_medium",
    "process_high",
    "process_long",
    "process_high_memory",
)
WHEN_LINE = "task.ext.when == null || task.ext.when"


class GroovyError(Exception):
    """Groovy this renderer does not understand, or an ``error(...)`` the module raised."""


class ModuleError(GroovyError):
    """The module called ``error(message)`` while its script section was evaluated."""


# --------------------------------------------------------------------------- values


class Staged(str):
    """A staged input file: renders as its file name, like a Nextflow path input."""


class Obj:
    """A Groovy object with properties; ``lenient`` objects return null for missing ones
    (``task.ext.prefix`` when no prefix is configured)."""

    def __init__(self, name: str, values: dict[str, Any], *, lenient: bool = False) -> None:
        self._name = name
        self._values = dict(values)
        self._lenient = lenient

    def get(self, attr: str) -> Any:
        if attr in self._values:
            return self._values[attr]
        if self._lenient:
            return None
        msg = f"{self._name} has no property '{attr}'"
        raise GroovyError(msg)

    def __repr__(self) -> str:
        return f"Obj({self._name}, {self._values})"


def truthy(value: Any) -> bool:
    """Groovy truth: null, false, 0, '' and empty collections are false."""
    if isinstance(value, Obj):
        return True
    return bool(value)


def to_text(value: Any) -> str:
    """How a value is interpolated into a GString."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, Obj):
        msg = f"cannot interpolate the object {value!r}"
        raise GroovyError(msg)
    if isinstance(value, list):
        return "[" + ", ".join(to_text(v) for v in value) + "]"
    return str(value)


def make_context(
    *,
    process: str,
    meta: dict[str, Any],
    cpus: int = 2,
    args: str | None = None,
    prefix: str | None = None,
    accelerator: int | None = None,
    container_engine: str | None = None,
    singularity_pull_docker_container: bool | None = None,
    module_dir: str = "/modules/scrcl/scrcl/x",
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The names a module's Groovy can see, filled with test values."""
    ext = {"args": args, "prefix": prefix, "singularity_pull_docker_container": singularity_pull_docker_container}
    task = Obj(
        "task",
        {
            "cpus": cpus,
            "process": process,
            "ext": Obj("task.ext", {k: v for k, v in ext.items() if v is not None}, lenient=True),
            "accelerator": Obj("task.accelerator", {"request": accelerator}) if accelerator else None,
        },
    )
    workflow = Obj("workflow", {"containerEngine": container_engine, "profile": "test"})
    ctx: dict[str, Any] = {
        "task": task,
        "workflow": workflow,
        "meta": Obj("meta", meta),
        "moduleDir": module_dir,
    }
    ctx.update(inputs or {})
    return ctx


# --------------------------------------------------------------------------- strings


def read_string(src: str, pos: int) -> tuple[str, int]:
    """Return the raw text of the string literal starting at ``pos`` (quotes included) and
    the position after it. Handles '...', "...", and triple-quoted forms, escapes, and
    nested strings inside ``${...}``."""
    for quote in ('"""', "'''", '"', "'"):
        if src.startswith(quote, pos):
            break
    else:
        msg = f"no string literal at: {src[pos : pos + 30]!r}"
        raise GroovyError(msg)
    i = pos + len(quote)
    while i < len(src):
        ch = src[i]
        if ch == "\\":
            i += 2
            continue
        if quote[0] == '"' and src.startswith("${", i):
            i = _skip_braces(src, i + 1)
            continue
        if src.startswith(quote, i):
            return src[pos : i + len(quote)], i + len(quote)
        i += 1
    msg = f"unterminated string literal: {src[pos : pos + 40]!r}"
    raise GroovyError(msg)


def _skip_braces(src: str, pos: int) -> int:
    """``src[pos]`` is '{'; return the position after its matching '}' (strings skipped)."""
    depth = 0
    i = pos
    while i < len(src):
        ch = src[i]
        if ch in "'\"":
            _, i = read_string(src, i)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    msg = f"unbalanced braces: {src[pos : pos + 40]!r}"
    raise GroovyError(msg)


_ESCAPES = {"\\": "\\", "$": "$", '"': '"', "'": "'", "n": "\n", "t": "\t"}
_DOLLAR_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def render_string(literal: str, ctx: dict[str, Any]) -> str:
    """Evaluate a Groovy string literal (quotes included) like Groovy would."""
    for quote in ('"""', "'''", '"', "'"):
        if literal.startswith(quote) and literal.endswith(quote) and len(literal) >= 2 * len(quote):
            break
    else:
        msg = f"not a string literal: {literal!r}"
        raise GroovyError(msg)
    body = literal[len(quote) : -len(quote)]
    gstring = quote[0] == '"'
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1 : i + 2]
            if nxt == "\n":  # line continuation
                i += 2
                continue
            if nxt not in _ESCAPES:
                msg = f"unknown escape \\{nxt} in {literal[:60]!r}"
                raise GroovyError(msg)
            out.append(_ESCAPES[nxt])
            i += 2
            continue
        if gstring and ch == "$":
            if body.startswith("${", i):
                end = _skip_braces(body, i + 1)
                out.append(to_text(evaluate(body[i + 2 : end - 1], ctx)))
                i = end
                continue
            match = _DOLLAR_NAME.match(body, i + 1)
            if not match:
                msg = f"a bare '$' in {literal[:60]!r}: write \\$ for a shell variable"
                raise GroovyError(msg)
            out.append(to_text(evaluate(match.group(0), ctx)))
            i = match.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def unquote_plain(literal: str) -> str:
    """A single-quoted (non-interpolating) Groovy literal's value."""
    if not literal.startswith("'"):
        msg = f"expected a single-quoted string: {literal!r}"
        raise GroovyError(msg)
    return render_string(literal, {})


# --------------------------------------------------------------------------- expressions

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>\?:|==|!=|&&|\|\||[?:!()\[\],.])
      | (?P<num>\d+)
      | (?P<name>[A-Za-z_]\w*)
      | (?P<quote>['"])
    )""",
    re.VERBOSE,
)


def _tokenize(src: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    i = 0
    while i < len(src):
        if src[i:].strip() == "":
            break
        match = _TOKEN.match(src, i)
        if not match:
            msg = f"cannot read {src[i : i + 30]!r} in expression {src!r}"
            raise GroovyError(msg)
        if match.group("quote"):
            start = match.start("quote")
            literal, i = read_string(src, start)
            tokens.append(("str", literal))
            continue
        i = match.end()
        if match.group("op"):
            tokens.append(("op", match.group("op")))
        elif match.group("num"):
            tokens.append(("num", int(match.group("num"))))
        else:
            tokens.append(("name", match.group("name")))
    tokens.append(("end", None))
    return tokens


class _Parser:
    """Recursive descent over the tokens; evaluates as it parses, short-circuiting like
    Groovy (the branch not taken is parsed but not evaluated)."""

    def __init__(self, src: str, ctx: dict[str, Any]) -> None:
        self.src = src
        self.ctx = ctx
        self.tokens = _tokenize(src)
        self.pos = 0

    def peek(self) -> tuple[str, Any]:
        return self.tokens[self.pos]

    def take(self, kind: str, value: Any = None) -> Any:
        tok = self.tokens[self.pos]
        if tok[0] != kind or (value is not None and tok[1] != value):
            msg = f"expected {value or kind} at token {self.pos} of {self.src!r}, found {tok[1]!r}"
            raise GroovyError(msg)
        self.pos += 1
        return tok[1]

    def at(self, value: str) -> bool:
        tok = self.peek()
        return tok[0] in ("op", "name") and tok[1] == value

    def parse(self) -> Any:
        value = self.ternary(live=True)
        self.take("end")
        return value

    def ternary(self, *, live: bool) -> Any:
        cond = self.or_(live=live)
        if self.at("?:"):
            self.take("op", "?:")
            alt = self.ternary(live=live and not truthy(cond))
            return cond if truthy(cond) else alt
        if self.at("?"):
            self.take("op", "?")
            yes = self.ternary(live=live and truthy(cond))
            self.take("op", ":")
            no = self.ternary(live=live and not truthy(cond))
            return yes if truthy(cond) else no
        return cond

    def or_(self, *, live: bool) -> Any:
        left = self.and_(live=live)
        while self.at("||"):
            self.take("op", "||")
            right = self.and_(live=live and not truthy(left))
            left = truthy(left) or truthy(right)
        return left

    def and_(self, *, live: bool) -> Any:
        left = self.compare(live=live)
        while self.at("&&"):
            self.take("op", "&&")
            right = self.compare(live=live and truthy(left))
            left = truthy(left) and truthy(right)
        return left

    def compare(self, *, live: bool) -> Any:
        left = self.unary(live=live)
        for op in ("==", "!=", "in"):
            if self.at(op):
                self.pos += 1
                right = self.unary(live=live)
                if not live:
                    return None
                if op == "==":
                    return _plain(left) == _plain(right)
                if op == "!=":
                    return _plain(left) != _plain(right)
                if not isinstance(right, list):
                    msg = f"'in' needs a list on the right in {self.src!r}"
                    raise GroovyError(msg)
                return _plain(left) in [_plain(v) for v in right]
        return left

    def unary(self, *, live: bool) -> Any:
        if self.at("!"):
            self.take("op", "!")
            return not truthy(self.unary(live=live))
        return self.postfix(live=live)

    def postfix(self, *, live: bool) -> Any:
        value = self.primary(live=live)
        while self.at("."):
            self.take("op", ".")
            attr = self.take("name")
            if not live:
                continue
            if value is None:
                msg = f"null has no property '{attr}' in {self.src!r}"
                raise GroovyError(msg)
            if not isinstance(value, Obj):
                msg = f"cannot read '.{attr}' of {value!r} in {self.src!r}"
                raise GroovyError(msg)
            value = value.get(attr)
        return value

    def primary(self, *, live: bool) -> Any:
        kind, val = self.peek()
        if kind == "str":
            self.pos += 1
            return render_string(val, self.ctx) if live else None
        if kind == "num":
            self.pos += 1
            return val
        if kind == "op" and val == "(":
            self.take("op", "(")
            value = self.ternary(live=live)
            self.take("op", ")")
            return value
        if kind == "op" and val == "[":
            self.take("op", "[")
            items = []
            while not self.at("]"):
                items.append(self.ternary(live=live))
                if not self.at("]"):
                    self.take("op", ",")
            self.take("op", "]")
            return items
        if kind == "name":
            self.pos += 1
            if val in ("null", "true", "false"):
                return {"null": None, "true": True, "false": False}[val]
            if not live:
                return None
            if val not in self.ctx:
                msg = f"unknown name '{val}' in {self.src!r}"
                raise GroovyError(msg)
            return self.ctx[val]
        msg = f"unexpected {val!r} in {self.src!r}"
        raise GroovyError(msg)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Staged) else value


def evaluate(src: str, ctx: dict[str, Any]) -> Any:
    """Evaluate one Groovy expression of the supported subset."""
    return _Parser(src, ctx).parse()


# --------------------------------------------------------------------------- statements

_ASSIGN = re.compile(r"^(?P<def>def\s+)?(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<expr>.+)$")
_IF = re.compile(r"^if\s*\((?P<cond>.*)\)\s*\{$")
_ERROR = re.compile(r"^error\s*\(\s*(?P<msg>.*)\s*\)$|^error\s+(?P<msg2>.*)$")


def run_statements(lines: list[str], ctx: dict[str, Any]) -> set[str]:
    """Run ``script:``/``stub:`` statements in ``ctx`` (mutated). Returns the names assigned
    without ``def`` (which Nextflow also exposes to the ``output:`` block)."""
    exported: set[str] = set()
    i = 0
    stmts = [line.strip() for line in lines]
    while i < len(stmts):
        line = stmts[i]
        i += 1
        if not line or line.startswith("//"):
            continue
        if m := _IF.match(line):
            body = []
            while i < len(stmts) and stmts[i] != "}":
                body.append(stmts[i])
                i += 1
            if i == len(stmts):
                msg = f"unclosed if block: {line!r}"
                raise GroovyError(msg)
            i += 1  # the closing brace
            cond = evaluate(m.group("cond"), ctx)
            for stmt in body:
                e = _ERROR.match(stmt)
                if not e:
                    msg = f"only error(...) is understood inside an if block, not {stmt!r}"
                    raise GroovyError(msg)
                if truthy(cond):
                    raise ModuleError(to_text(evaluate(e.group("msg") or e.group("msg2"), ctx)))
            continue
        if m := _ASSIGN.match(line):
            ctx[m.group("name")] = evaluate(m.group("expr"), ctx)
            if not m.group("def"):
                exported.add(m.group("name"))
            continue
        msg = f"statement not understood: {line!r}"
        raise GroovyError(msg)
    return exported


# --------------------------------------------------------------------------- main.nf


@dataclass
class OutputChannel:
    """One ``output:`` line: its elements as (keyword, raw argument) and its options."""

    line: str
    elements: list[tuple[str, str]]
    emit: str | None
    topic: str | None
    optional: bool


@dataclass
class Section:
    """A ``script:`` or ``stub:`` section: statements, then one triple-quoted command."""

    statements: list[str]
    command: str  # the literal, with its triple quotes


@dataclass
class Module:
    path: Path
    name: str
    directives: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[OutputChannel] = field(default_factory=list)
    when: list[str] = field(default_factory=list)
    script: Section | None = None
    stub: Section | None = None

    def directive(self, keyword: str) -> str:
        """The source of a directive (``container``, ``conda``), possibly spanning lines."""
        text = "\n".join(self.directives)
        m = re.search(rf"^\s*{keyword}\s+", text, re.MULTILINE)
        if not m:
            msg = f"{self.name} has no {keyword} directive"
            raise GroovyError(msg)
        literal, _ = read_string(text, m.end())
        return literal

    def labels(self) -> list[str]:
        return [
            m.group(1)
            for line in self.directives
            if (m := re.match(r"""^\s*label\s+['"]([\w-]+)['"]\s*$""", line))
        ]

    def tag(self) -> str | None:
        for line in self.directives:
            if m := re.match(r"^\s*tag\s+(.+?)\s*$", line):
                return m.group(1)
        return None


_SECTION = re.compile(r"^\s*(input|output|when|script|stub|shell|exec)\s*:\s*$")


def parse_module(path: Path) -> Module:
    """Split a module's main.nf into its process sections."""
    lines = path.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*process\s+\w+\s*\{", line)), None)
    if start is None:
        msg = f"{path} defines no process"
        raise GroovyError(msg)
    name = re.match(r"^\s*process\s+(\w+)", lines[start]).group(1)
    # the process body ends at the last closing brace in column 0
    end = max(i for i, line in enumerate(lines) if line.rstrip() == "}")
    module = Module(path=path, name=name)
    section = "directives"
    buckets: dict[str, list[str]] = {"directives": [], "input": [], "output": [], "when": [], "script": [], "stub": []}
    for line in lines[start + 1 : end]:
        if m := _SECTION.match(line):
            section = m.group(1)
            if section not in buckets:
                msg = f"{path}: '{section}:' sections are not supported; use script:"
                raise GroovyError(msg)
            continue
        buckets[section].append(line)
    module.directives = buckets["directives"]
    module.inputs = [line.strip() for line in buckets["input"] if line.strip() and not line.strip().startswith("//")]
    module.outputs = [
        _parse_output(line.strip())
        for line in buckets["output"]
        if line.strip() and not line.strip().startswith("//")
    ]
    module.when = [line.strip() for line in buckets["when"] if line.strip()]
    module.script = _parse_section(buckets["script"], path, "script") if buckets["script"] else None
    module.stub = _parse_section(buckets["stub"], path, "stub") if buckets["stub"] else None
    return module


def _parse_section(lines: list[str], path: Path, label: str) -> Section:
    text = "\n".join(lines)
    at = text.find('"""')
    if at < 0:
        msg = f"{path}: the {label}: section has no triple-quoted command"
        raise GroovyError(msg)
    literal, after = read_string(text, at)
    if text[after:].strip():
        msg = f"{path}: text after the {label}: command: {text[after:].strip()[:40]!r}"
        raise GroovyError(msg)
    return Section(statements=text[:at].splitlines(), command=literal)


_KEYWORD = re.compile(r"\b(val|path|eval|env|stdout)\s*\(")


def _paren_arg(line: str, open_at: int) -> tuple[str, int]:
    """The text inside the parentheses opening at ``open_at`` (strings respected)."""
    depth = 0
    i = open_at
    while i < len(line):
        ch = line[i]
        if ch in "'\"":
            _, i = read_string(line, i)
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return line[open_at + 1 : i].strip(), i + 1
        i += 1
    msg = f"unbalanced parentheses: {line!r}"
    raise GroovyError(msg)


def _parse_output(line: str) -> OutputChannel:
    elements = []
    i = 0
    while m := _KEYWORD.search(line, i):
        arg, i = _paren_arg(line, m.end() - 1)
        elements.append((m.group(1), arg))
    opts = dict(re.findall(r"\b(emit|topic|optional)\s*:\s*([\w.]+)", line[i:]))
    return OutputChannel(
        line=line,
        elements=elements,
        emit=opts.get("emit"),
        topic=opts.get("topic"),
        optional=opts.get("optional") == "true",
    )


def element_name(keyword: str, arg: str) -> str:
    """The element name nf-core's meta.yml uses: the argument, unquoted."""
    arg = arg.split(",")[0].strip() if not arg.startswith(("'", '"')) else read_string(arg, 0)[0]
    if arg[:1] in ("'", '"'):
        return arg[1:-1]
    return arg


# --------------------------------------------------------------------------- running


@dataclass
class Rendered:
    """A section rendered for one task: the bash script and the output-visible variables."""

    script: str
    ctx: dict[str, Any]
    exported: set[str]


def render_section(section: Section, ctx: dict[str, Any]) -> Rendered:
    ctx = dict(ctx)
    exported = run_statements(section.statements, ctx)
    return Rendered(script=render_string(section.command, ctx), ctx=ctx, exported=exported)


def output_context(module: Module, rendered: Rendered, base: dict[str, Any]) -> dict[str, Any]:
    """What the output block sees: inputs and task values plus the non-``def`` variables."""
    ctx = dict(base)
    for name in rendered.exported:
        ctx[name] = rendered.ctx[name]
    return ctx


def declared_paths(module: Module, ctx: dict[str, Any]) -> dict[str, list[str]]:
    """emit -> rendered path patterns of that output channel."""
    result: dict[str, list[str]] = {}
    for out in module.outputs:
        paths = [render_string(arg, ctx) for kw, arg in out.elements if kw == "path"]
        if paths:
            result[out.emit or out.line] = paths
    return result


def eval_commands(module: Module) -> dict[str, str]:
    """emit -> the bash command of its eval(...) element."""
    result = {}
    for out in module.outputs:
        for kw, arg in out.elements:
            if kw == "eval":
                result[out.emit or out.line] = unquote_plain(arg)
    return result


BASH = ["bash", "-C", "-e", "-u", "-o", "pipefail"]  # process.shell of nf-core pipelines


def run_bash_script(script: str, workdir: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a rendered command the way a Nextflow task does: ``.command.sh`` in the task dir."""
    (workdir / ".command.sh").write_text("#!/bin/bash -ue\n" + script.strip("\n") + "\n")
    return subprocess.run(
        [*BASH, ".command.sh"], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_eval(command: str, workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run an eval output the way Nextflow's wrapper does: ``bash -c "<cmd with " escaped>"``."""
    line = 'bash -c "' + command.replace('"', '\\"') + '"'
    return subprocess.run(
        ["bash", "-c", line], cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False
    )
