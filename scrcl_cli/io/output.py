"""Guarded, atomic outputs: nothing the tool did not write is ever replaced or deleted.

Every path a command writes goes through :func:`check_outputs` before any computation. It
refuses an output that is, contains or sits inside an input (the query, the model folder), one
that is or contains the working directory, two outputs naming the same file, and, when
replacing, anything but a regular file (or, for a model folder, a folder holding only the files
its own manifest lists). Hard links count: an output sharing an inode with an input is the
input.

Files are then written to a temporary name beside their destination, created exclusively, and
renamed onto it (:func:`atomic_path`), so a killed run leaves the previous complete file or
nothing. A model folder is swapped with the kernel's atomic exchange where it has one; the old
folder's own files are then deleted one by one, never a tree.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ScrclError

log = logging.getLogger(__name__)

TMP_TAG = ".scrcl-tmp-"
MANIFEST_NAME = "scrcl_model.json"
OutputKind = Literal["file", "model", "log"]

_stop_requested = False


def request_stop() -> None:
    """Make every later output commit fail with KeyboardInterrupt (called by the CLI's signal handler)."""
    global _stop_requested
    _stop_requested = True


def check_stop() -> None:
    """Raise KeyboardInterrupt when a stop was requested (the signal's own exception can be lost)."""
    if _stop_requested:
        raise KeyboardInterrupt


@dataclass(frozen=True)
class Output:
    """One path a command will write: the option that named it and what it is."""

    path: Path
    option: str
    kind: OutputKind = "file"
    # For a model folder: the names of the entries scrcl-cli wrote, or None when it holds anything else
    # (`bundle.owned_entries`); without it an existing folder is never replaced.
    owned: Callable[[Path], list[str] | None] | None = None


def _real(path: Path) -> Path:
    """The absolute path with every symlink in its folders resolved, the last component kept as is."""
    # Not os.path.abspath: it drops "link/.." as text, where the kernel first follows the link.
    text = os.fspath(path)
    full = text if os.path.isabs(text) else os.path.join(os.getcwd(), text)
    head, name = os.path.split(full.rstrip("/") or "/")
    if name in ("", ".", ".."):
        return Path(os.path.realpath(full))
    return Path(os.path.realpath(head)) / name


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _inodes(paths: Iterable[Path]) -> dict[tuple[int, int], Path]:
    """(st_dev, st_ino) -> path of every existing file among `paths` and inside those that are folders."""
    found: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        found[(st.st_dev, st.st_ino)] = p
        if stat.S_ISDIR(st.st_mode):
            try:
                entries = list(os.scandir(p))
            except OSError:
                continue
            for entry in entries:
                try:
                    est = entry.stat(follow_symlinks=True)
                except OSError:
                    continue
                found[(est.st_dev, est.st_ino)] = Path(entry.path)
    return found


def _check_replaceable(out: Output) -> None:
    p = out.path
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise ScrclError(f"{out.option} {p} is a symbolic link", "Pass the real path of the output, or remove the link")
    if out.kind == "model":
        if not stat.S_ISDIR(st.st_mode):
            raise ScrclError(f"{out.option} {p} exists and is not a folder", "Choose another path for the model folder")
        if out.owned is None or out.owned(p) is None:
            raise ScrclError(
                f"{out.option} {p} exists and holds files scrcl-cli did not write; replacing it would delete them",
                "Choose a new folder for the model, or empty this one yourself",
            )
        return
    if stat.S_ISDIR(st.st_mode):
        raise ScrclError(f"{out.option} {p} is a folder", "Pass a file path for this output")
    if not stat.S_ISREG(st.st_mode):
        raise ScrclError(
            f"{out.option} {p} is not a regular file (a device, pipe or socket) and is never replaced",
            "Pass the path of a regular file",
        )


def _check_parent(out: Output) -> None:
    """The nearest existing folder above the output must be a writable folder; nothing is created yet."""
    parent = _real(out.path).parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ScrclError(
            f"cannot write {out.option} {out.path}: {probe} is a file, not a folder", "Choose an output path in a writable folder"
        )
    test = probe / f".scrcl-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:  # access() is no proof for root or on read-only mounts: create and remove a file of our own
        os.close(os.open(test, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        os.unlink(test)
    except OSError as exc:
        raise ScrclError(
            f"cannot write {out.option} {out.path}: {probe} is not writable ({exc.strerror})",
            "Choose an output path in a writable folder",
        ) from None


def check_outputs(outputs: Sequence[Output], *, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse, before any work, every output this run must not write (see the module docstring).

    `inputs` are the files and folders the run reads (the query `.h5ad`, the model folder).
    Log files are appended to, so they need no ``--overwrite`` but are checked all the same.
    """
    cwd = Path(os.path.realpath(os.getcwd()))
    real_inputs = [(p, Path(os.path.realpath(p))) for p in inputs]
    input_inodes = _inodes(inputs)
    seen: list[tuple[Output, Path]] = []
    for out in outputs:
        if not str(out.path) or str(out.path).strip() != str(out.path):
            raise ScrclError(f"{out.option} {str(out.path)!r} is not a usable path", "Pass a file or folder name")
        target = _real(out.path)
        for given, real in real_inputs:
            if target == real or _inside(target, real):
                where = "is the input" if target == real else "lies inside the input"
                raise ScrclError(
                    f"{out.option} {out.path} {where} {given}", "Choose another output path; inputs are never overwritten"
                )
            if _inside(real, target):
                raise ScrclError(
                    f"{out.option} {out.path} contains the input {given}", "Choose an output path that does not hold the inputs"
                )
        if target == cwd or _inside(cwd, target):
            raise ScrclError(
                f"{out.option} {out.path} is or contains the working directory", "Choose a new file or folder for this output"
            )
        for other, other_target in seen:
            if target == other_target:
                raise ScrclError(
                    f"{out.option} and {other.option} name the same file ({out.path})", "Give each output its own path"
                )
            if _inside(target, other_target) or _inside(other_target, target):
                raise ScrclError(
                    f"{out.option} {out.path} and {other.option} {other.path} lie one inside the other",
                    "Give each output its own path",
                )
        seen.append((out, target))
        if os.path.lexists(out.path):
            try:
                st = os.stat(out.path)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) in input_inodes:
                raise ScrclError(
                    f"{out.option} {out.path} is the same file as the input {input_inodes[(st.st_dev, st.st_ino)]} "
                    "(a hard or symbolic link)",
                    "Choose another output path; inputs are never overwritten",
                )
            if out.kind == "log":
                _check_log_file(out)
            elif not overwrite:
                raise ScrclError(f"{out.option} {out.path} already exists", "Pass --overwrite or choose another output path")
            else:
                _check_replaceable(out)
        _check_parent(out)
    for out in outputs:
        if out.kind != "log":
            remove_stale_temporaries(out.path, inputs)


def _check_log_file(out: Output) -> None:
    st = os.lstat(out.path)
    if stat.S_ISLNK(st.st_mode):
        raise ScrclError(f"{out.option} {out.path} is a symbolic link", "Pass the real path of the log file")
    if not stat.S_ISREG(st.st_mode):
        raise ScrclError(f"{out.option} {out.path} is not a regular file", "Pass the path of a log file")
    if st.st_nlink > 1:
        raise ScrclError(f"{out.option} {out.path} has other hard links, which would change too", "Pass a log file of its own")


def open_log(path: Path) -> int:
    """Open a checked log file for appending, creating its folders; a file descriptor (never follows a symlink)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)


def _tmp_name(dest: Path) -> Path:
    return dest.parent / f".{dest.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def stale_temporaries(dest: Path) -> list[Path]:
    """Entries beside `dest` named like the temporaries of a run (alive or killed)."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    return sorted(dest.parent.glob(f".{dest.name}{TMP_TAG}*"))


def temporary_name(dest: Path) -> Path:
    """A new name for a temporary beside `dest` that `remove_stale_temporaries` recognises once
    its run is dead (the out-of-core scratch folder of `train` is one)."""
    return _tmp_name(Path(dest))


# File names a killed `train` may have left in its temporary folders: the model folder's, and the
# out-of-core scratch folder's smoothed inputs (t up to the largest --t0/--t1 plus one).
_MODEL_FILES = frozenset(
    {
        *(f"smoothed_t{t}.npy" for t in range(66)),
        MANIFEST_NAME,
        "genes.txt",
        "weights.pt",
        "encoder_fused.onnx",
        "encoder_cell.onnx",
        "loss_log.csv",
        "train_embedding.npy",
        "train_clusters.csv",
        *(f"encoder_{view}_stage{i}.onnx" for view in ("fused", "cell") for i in range(3)),
    }
)


def _ours(entry: Path, dest: Path, protected: dict[tuple[int, int], Path]) -> bool:
    """True only for a temporary a killed scrcl-cli run left: our exact name, a dead pid, our uid, no other links.

    A folder counts only when it holds nothing but model files. Inputs are never ours.
    """
    import re

    m = re.fullmatch(re.escape(f".{dest.name}{TMP_TAG}") + r"(\d+)-[0-9a-f]{8}", entry.name)
    if m is None or (int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1)))) or int(m.group(1)) == os.getpid():
        return False
    try:
        st = os.lstat(entry)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) in protected or st.st_uid != os.getuid():
        return False
    if stat.S_ISREG(st.st_mode):
        return st.st_nlink == 1
    if not stat.S_ISDIR(st.st_mode):
        return False
    for sub in os.scandir(entry):
        sst = sub.stat(follow_symlinks=False)
        if (
            sub.name not in _MODEL_FILES
            or not stat.S_ISREG(sst.st_mode)
            or sst.st_nlink != 1
            or (sst.st_dev, sst.st_ino) in protected
        ):
            return False
    return True


def remove_stale_temporaries(dest: Path, inputs: Sequence[Path] = ()) -> int:
    """Delete the temporaries a killed run left beside `dest` (see `_ours`); log the others. Returns how many."""
    protected = _inodes(inputs)
    n = 0
    for entry in stale_temporaries(dest):
        if _ours(entry, Path(dest), protected):
            _remove_temporary(entry, entry.is_dir())
            n += 1
        else:
            log.info("left %s in place: it looks like a temporary but may not be a killed run's", entry)
    if n:
        log.info("removed %d temporary file(s) a killed run left beside %s", n, dest)
    return n


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the kernel or libc lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    res = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_folder(tmp: Path, dest: Path, owned_entries: Callable[[Path], list[str] | None]) -> None:
    """Put the new folder `tmp` at `dest`, then delete the old folder's own files (checked as ours again)."""
    owned = owned_entries(dest)
    if owned is None:  # changed since the check: never delete what is not ours
        raise ScrclError(f"{dest} now holds files scrcl-cli did not write", "Choose a new folder for the model")
    old = _tmp_name(dest)
    if _exchange(tmp, dest):
        old = tmp  # tmp now holds the previous model
    else:
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)  # put the previous model back
            raise
    for name in owned:
        try:
            (old / name).unlink()
        except FileNotFoundError:
            pass
    try:
        old.rmdir()
    except OSError:
        log.warning("left the previous model's folder at %s: it gained files while being replaced", old)


def _remove_temporary(tmp: Path, directory: bool) -> None:
    if directory:
        if tmp.is_dir():
            for entry in os.scandir(tmp):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
            try:
                tmp.rmdir()
            except OSError:
                log.warning("could not remove the temporary folder %s", tmp)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(
    dest: Path, *, overwrite: bool, directory: bool = False, owned: Callable[[Path], list[str] | None] | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary path beside `dest`; on success move it onto `dest`.

    The destination's folders are created here, at commit time, never by the checks. On any
    exception (KeyboardInterrupt from SIGINT/SIGTERM included) the temporary is removed and
    `dest` keeps its previous content. The caller has run :func:`check_outputs` on `dest`;
    the replaceability checks run again here, just before the rename.
    """
    dest = Path(dest)
    out = Output(dest, "the model folder" if directory else "the output file", "model" if directory else "file", owned)
    created: list[Path] = []
    parent = dest.parent if str(dest.parent) else Path(".")
    probe = parent
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    if directory:
        tmp.mkdir()
    else:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    try:
        yield tmp
        check_stop()  # a signal arrived while writing, even if its KeyboardInterrupt was lost
        if os.path.lexists(dest):
            if not overwrite:
                raise ScrclError(f"{dest} already exists", "Pass --overwrite or choose another output path")
            _check_replaceable(out)
        if directory and dest.exists():
            assert owned is not None  # _check_replaceable refused the folder otherwise
            _replace_folder(tmp, dest, owned)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove_temporary(tmp, directory)
        for folder in created:  # folders made for this output only, innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


COPY_BLOCK = 16 << 20


def copy_file(src: Path, dest: Path) -> None:
    """Copy bytes in blocks, so that SIGTERM/SIGINT (a KeyboardInterrupt between blocks) stops a large copy."""
    with Path(src).open("rb") as fin, Path(dest).open("wb") as fout:
        while block := fin.read(COPY_BLOCK):
            fout.write(block)
            check_stop()


def write_text_atomic(text: str, dest: Path, *, overwrite: bool) -> None:
    """Write a text file (CSV tables) through a temporary file and a rename."""
    with atomic_path(dest, overwrite=overwrite) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(write: Callable[[Path], None], dest: Path, *, overwrite: bool) -> None:
    """Call ``write(tmp)`` and move the temporary onto `dest` (for writers that take a path, e.g. matplotlib)."""
    with atomic_path(dest, overwrite=overwrite) as tmp:
        write(tmp)


def disk_full_error(exc: OSError, size: int | None = None) -> ScrclError | None:
    """The one-line error for a full disk or quota (ENOSPC, EDQUOT), or None for other OS errors."""
    if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    need = f" (about {size / 2**20:.0f} MiB to write)" if size else ""
    return ScrclError(f"the disk is full{where}{need}", "Free space or choose an output on another disk")
