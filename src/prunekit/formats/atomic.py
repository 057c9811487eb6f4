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

The folder is created with the permissions the umask gives (``0755`` under the usual ``022``), not
``mkdtemp``'s private ``0700``: a serving container running as another user must be able to read
it. A ``--out`` that is a symbolic link to a folder is written at the link's target (the link stays
and points at the new folder); a dangling link is refused before any work. Parent folders that a
run creates for ``--out`` are removed again when the run fails.
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
_MARGIN = 0.05  # files beside the weights (config, tokenizer, report) and file-system overhead, as a share
_MARGIN_MIN = 2**20  # and at least this much


class OutputExistsError(ConfigError, FileExistsError):
    pass


def step(name: str) -> None:
    if FAULT is not None:
        FAULT(name)


def space_needed(weights_bytes: int, extra_bytes: int = 0) -> int:
    """Free bytes a save of ``weights_bytes`` of weights needs: a margin proportional to the size (not fixed)."""
    return int(weights_bytes * (1 + _MARGIN)) + extra_bytes + _MARGIN_MIN


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_free_space(out_dir: str | os.PathLike, weights_bytes: int, extra_bytes: int = 0, what: str = "--out") -> None:
    """Fail (``ENOSPC``, one line) if the disk under ``out_dir`` cannot hold the save; call it before the work."""
    if not weights_bytes:
        return
    need = space_needed(weights_bytes, extra_bytes)
    where = existing_ancestor(Path(out_dir).expanduser().absolute())
    free = shutil.disk_usage(where).free
    if free < need:
        raise OSError(errno.ENOSPC, f"not enough disk space for {what} {str(out_dir)!r}: the saved model needs about "
                      f"{need / 2**20:.1f} MB, {free / 2**20:.1f} MB are free in {str(where)!r}; free space or choose "
                      f"another {what}")


def _stale_old(out: Path) -> Path | None:
    """The old folder a crash left beside ``out`` between the two renames (its process is gone), if any."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.old-(\d+)-")
    if not out.parent.is_dir():
        return None
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            return p
    return None


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out_dir`` cannot be written; returns the folder a save will write.

    A symbolic link to a folder gives the link's target (written in place of it; the link stays). Nothing
    is created here (see :func:`reserve_output`).
    """
    out = Path(out_dir).expanduser()
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        if not target.exists():
            raise ConfigError(f"--out {str(out)!r} is a symbolic link to {str(target)!r}, which does not exist; "
                              "remove the link or create its target folder, or choose another --out")
        out = target
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} is a file, not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {str(out)!r} already exists; choose another --out or pass --overwrite")
    old = None if out.exists() or overwrite else _stale_old(out)
    if old is not None:  # a crash between the two renames: the old folder is the last complete one
        os.rename(old, out)
        log.warning("restored %s from %s, left by an interrupted save", out, old.name)
        raise OutputExistsError(f"output folder {str(out)!r} already exists (put back from {old.name}, which an "
                                "interrupted save left); choose another --out or pass --overwrite")
    parent = out.parent if str(out.parent) else Path(".")
    base = existing_ancestor(parent)
    if not base.is_dir():
        raise ConfigError(f"cannot create the folder {str(parent)!r} for --out ({str(base)!r} is a file); choose "
                          "another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into {str(base)!r} (no permission or a read-only file system); "
                          "choose another --out")
    return out


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; returns those created, deepest first."""
    made = []
    p = parent
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the folder {str(parent)!r} for --out ({e.strerror}); choose another --out") \
            from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, while they are empty."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            return


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (else set and restore at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share(folder: Path) -> None:
    """Give ``folder`` and everything in it the permissions the umask allows (``0755``/``0644`` under ``022``).

    ``mkdtemp`` makes the folder ``0700`` and safetensors (0.8) writes its files ``0600``, so without
    this a serving container running as another user could not read the saved model.
    """
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link's own mode means nothing; its target is not ours
                os.chmod(path, mode & ~mask)


def _remove(p: Path) -> None:
    """Delete a folder, or only the link when ``p`` is a symbolic link (``rmtree`` refuses links)."""
    if p.is_symlink():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


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
            _remove(p)
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
    made = _make_parents(out.parent)
    lock = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        _remove_empty(made)
        raise ConfigError(f"--out {str(out)!r} cannot be written ({e.strerror} in folder {str(out.parent)!r}); "
                          "choose an --out in a folder you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        _remove_empty(made)
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
        if not out.exists():  # the run failed: the folders made for it go too
            _remove_empty(made)


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
        _remove(tmp)
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
        check_free_space(out, needed_bytes)  # the safety net: the CLI checked an estimate before the work
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            step("write")
            write(tmp)
            share(tmp)
            _swap_in(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e):
                raise OSError(errno.ENOSPC, f"disk full while writing {str(out)!r}; nothing was left behind. Free "
                              "space or choose another --out") from e
            raise
    return out
