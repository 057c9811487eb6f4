"""Output folders that are complete or absent, never half-written.

A save writes into a hidden temporary folder beside the target (``.NAME.tmp-PID-XXXX``) and only
then puts it in place:

* a new target: one ``rename`` — atomic;
* ``--overwrite``: on Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically, so
  at every instant the target is the complete old folder or the complete new one; the old copy
  (now in the temporary name) is deleted afterwards. Where the exchange is not available, the old
  folder is first renamed to ``.NAME.old-PID-XXXX``; a crash between the two renames leaves the
  target missing for that instant, and the next run for the same target puts the old folder back.

A run reserves its target with an exclusive lock file (``.NAME.lock``) before any work, so a second
run writing to the same place fails at once instead of after its whole prune. Temporary folders
left by runs that were killed (``kill -9``: no cleanup code runs) are removed by the next run for
the same target; a temporary folder whose process is alive belongs to a running save and is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: test hook: called with the name of every step of a save ("write", "exchange", …) before it runs
FAULT: Callable[[str], None] | None = None
#: locks this process holds, by target path (a process re-entering its own reservation is fine)
_HELD: dict[str, int] = {}
_MARGIN = 64 * 2**20  # tokenizer, config and report files beside the weights


class OutputExistsError(ConfigError, FileExistsError):
    pass


def step(name: str) -> None:
    if FAULT is not None:
        FAULT(name)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out_dir`` cannot be written."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} is a file, not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {str(out)!r} already exists; choose another --out or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the folder {str(parent)!r} for --out ({e.strerror}); choose another --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into {str(parent)!r} (no permission or a read-only file system); "
                          "choose another --out")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Remove what killed runs left beside ``out``; put back an old folder a crash left displaced."""
    parent, done = out.parent, []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    for p in sorted(parent.iterdir()) if parent.is_dir() else []:
        m = pattern.match(p.name)
        if not m or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            os.rename(p, out)  # the swap never finished: the old folder is the last complete one
            log.warning("restored %s from %s, left by an interrupted save", out, p.name)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by an interrupted save (process %s)", p, m.group(2))
        done.append(p.name)
    return done


@contextlib.contextmanager
def reserve_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Check ``out_dir``, lock it for this process, clean what killed runs left; held until exit."""
    out = check_output_dir(out_dir, overwrite)
    key = str(out.resolve())
    if key in _HELD:  # this process reserved it already (the CLI, before calling a save function)
        yield out
        return
    lock = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"--out {str(out)!r} cannot be written ({e.strerror} in folder {str(out.parent)!r}); "
                          "choose an --out in a folder you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"--out {str(out)!r} is being written by another prunekit run (process {holder}); "
                          "wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[key] = fd
    try:
        clean_stale(out)
        yield out
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); ``False`` where the system cannot."""
    if sys.platform != "linux":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.exists():
        step("rename")
        os.rename(tmp, out)
        return
    step("exchange")
    if _exchange(tmp, out):
        step("remove-old")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()  # a unique name, free for the rename
    step("rename-old")
    os.rename(out, old)
    step("rename-new")
    os.rename(tmp, out)
    step("remove-old")
    shutil.rmtree(old, ignore_errors=True)


def is_disk_full(e: BaseException) -> bool:
    """``ENOSPC`` however it is wrapped (safetensors and tokenizers raise their own exception types)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_folder(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False,
                  needed_bytes: int = 0) -> Path:
    """Run ``write(tmp)`` into a temporary folder and put it at ``out_dir`` only when it is complete."""
    with reserve_output(out_dir, overwrite) as out:
        need = int(needed_bytes * 1.02) + _MARGIN if needed_bytes else 0
        free = shutil.disk_usage(out.parent).free
        if need and free < need:
            raise OSError(errno.ENOSPC, f"not enough disk space in {str(out.parent)!r}: need about {need / 2**20:.0f} "
                          f"MB, {free / 2**20:.0f} MB free; free space or choose another --out")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            step("write")
            write(tmp)
            _swap_in(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise OSError(errno.ENOSPC, f"disk full while writing {str(out)!r}; nothing was left behind. Free "
                              "space or choose another --out") from e
            raise
    return out
