"""Process helpers shared by the benchmarks: memory probes and a guarded subprocess runner.

Every measured configuration runs in its own process. `run_guarded` starts it, polls its
resident memory and kills it when it passes an RSS limit (the benchmark machine may be shared;
a dense N x N run must not take it down), and reads the child's own peak RSS from os.wait4.
Linux only (/proc, ru_maxrss in KiB).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def rss_now(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident set size in bytes of `pid` (default this process); 0 if it is gone.

    field: "VmRSS" (all resident pages) or "RssAnon" (anonymous pages only: without the pages of
    memory-mapped files, which the kernel can write back and drop under pressure).
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_peak() -> int:
    """Peak resident set size of this process in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def loadavg() -> float:
    """1-minute load average: the machine may be shared, timings are only as quiet as it was."""
    try:
        with open("/proc/loadavg") as fh:
            return float(fh.read().split()[0])
    except OSError:
        return float("nan")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def default_rss_limit() -> int:
    """Half of the memory available now, at most 64 GiB."""
    return min(mem_available() // 2, 64 * 2**30)


@dataclass
class Guarded:
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    peak_rss: int  # ru_maxrss of the child, bytes
    killed: str | None  # why the runner killed it, if it did
    peak_anon: int = 0  # largest RssAnon seen while polling, bytes (misses peaks shorter than the poll)

    def status(self) -> str:
        if self.killed:
            return self.killed
        if self.returncode == 0:
            return "ok"
        oom = any(s in self.stderr for s in ("OutOfMemoryError", "out of memory", "can't allocate memory",
                                              "DefaultCPUAllocator: can't allocate"))
        if oom:
            return "oom"
        return "killed by signal 9 (system out of memory?)" if self.returncode == -9 else f"failed rc={self.returncode}"

    def last_json(self) -> dict[str, Any] | None:
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        return json.loads(lines[-1]) if lines else None

    def error_line(self) -> str:
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return lines[-1][:300] if lines else ""


def run_guarded(cmd: list[str], *, timeout: float, rss_limit: int, poll_s: float = 0.05,
                env: dict[str, str] | None = None) -> Guarded:
    """Run `cmd`, kill it past `timeout` seconds or `rss_limit` bytes of anonymous memory; report
    its peak RSS and peak anonymous memory.

    The guard watches anonymous memory (RssAnon), not RSS: resident pages of memory-mapped files
    (`train --out-of-core`) count in RSS but the kernel reclaims them under pressure.
    env: extra environment variables for the child.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        # The repository root on the child's path, so that `-m benchmarks.<suite>` children find the package.
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": path, **(env or {})})
        killed = None
        peak_anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - t0
            anon = rss_now(proc.pid, "RssAnon")
            peak_anon = max(peak_anon, anon)
            if killed is None and anon > rss_limit:
                killed = f"killed: anonymous memory passed the {rss_limit / 2**30:.1f} GiB guard after {elapsed:.0f} s"
                proc.kill()
            elif killed is None and elapsed > timeout:
                killed = f"timeout after {timeout:.0f} s"
                proc.kill()
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Guarded(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                       wall, usage.ru_maxrss * 1024, killed, peak_anon)


def add_report_args(p: Any) -> None:
    """The options every report-writing suite shares: --json (every score) and --output (the markdown)."""
    p.add_argument("--json", default=None, help="write every score here")
    p.add_argument("--output", default=None, help="write the markdown report here (default: print only)")


def existing_data_dir(path: str | os.PathLike[str]) -> Path:
    """The shared datasets' folder, or exit with a one-line error naming the fix."""
    data_dir = Path(path)
    if not data_dir.exists():
        raise SystemExit(f"error: {data_dir} not found. Pass --data-dir with the shared datasets")
    return data_dir


def emit_markdown(md: str, path: os.PathLike[str] | None) -> None:
    """Print a benchmark's markdown report and, when `path` is given, write it there too."""
    print()
    print(md)
    if path:
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(md)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_cmd(script: str, *argv: str) -> list[str]:
    return [sys.executable, script, *argv]


def module_cmd(module: str, *argv: str) -> list[str]:
    """A child process running the suite `module` (``benchmarks.<name>``, or ``__main__`` of one run as a suite)."""
    name = module if module.startswith("benchmarks.") else f"benchmarks.{module.rsplit('.', 1)[-1]}"
    return [sys.executable, "-m", name, *argv]


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks run --json OUT.json -- CMD ARGS...``: run CMD, record wall time and peak RSS."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=24 * 3600.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    g = run_guarded(cmd, timeout=args.timeout, rss_limit=1 << 62, poll_s=0.2)
    sys.stdout.write(g.stdout)
    sys.stderr.write(g.stderr)
    args.json.write_text(json.dumps({"cmd": cmd, "status": g.status(), "returncode": g.returncode,
                                     "wall_s": round(g.wall_s, 3), "peak_rss": g.peak_rss,
                                     "peak_anon": g.peak_anon}))
    sys.exit(0 if g.returncode == 0 else 1)


if __name__ == "__main__":
    main()
