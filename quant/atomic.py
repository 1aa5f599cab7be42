"""Outputs that appear only complete: written under a temporary name next to OUT, then renamed into place.

* The temporary name carries the writer's process id: ``.<name>.headroom-tmp-<pid>`` (a folder being replaced is
  first moved aside to ``.<name>.headroom-old-<pid>``). A long OUT name is shortened in the temporary name so that
  the temporary always fits the file system's name limit when OUT does.
* Any exception - an OS error, a bug, Ctrl-C, or a SIGTERM/SIGHUP that the command line turns into one - removes
  the temporary and the parent folders this run created. That cleanup never raises: what it cannot remove is
  named in the error instead.
* A process killed outright (SIGKILL, power loss) cannot clean up. The next run into the same OUT removes the
  temporaries whose process is gone (ours by name, for that OUT, and only when no process with that id runs),
  puts back an OUT that was moved aside and never replaced, and says so.
* OS errors become :class:`OutputError`: one line naming the path and saying what to do (read-only folder, disk
  full, a file where a folder should be, a name too long...). Free space is checked before anything is written.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..units import format_gib

log = logging.getLogger(__name__)

TEMP_TAG = "headroom-tmp"  # .<name>.headroom-tmp-<pid>: being written by process <pid>
OLD_TAG = "headroom-old"  # .<name>.headroom-old-<pid>: the previous OUT, moved aside by process <pid>
_OURS = re.compile(rf"^\..+\.({TEMP_TAG}|{OLD_TAG})-(\d+)$")
NAME_MAX = 255  # bytes in one path component on every common Linux/macOS file system
FREE_SPACE_MARGIN = 4 * 2**20  # headers on top of the planned tensor bytes

T = TypeVar("T")


class OutputError(OSError):
    """Writing OUT failed for a reason outside headroom (permissions, space, the path): one line saying what to do."""

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        super().__init__(message)
        self.errno = cause.errno if cause is not None else None


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------

def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def side_path(dst: Path, tag: str = TEMP_TAG, pid: int | None = None) -> Path:
    """``.<dst name>.<tag>-<pid>`` next to ``dst``; the name part is cut (at a character boundary) so that the whole
    name fits the file system's limit."""
    suffix = f".{tag}-{os.getpid() if pid is None else pid}"
    room = _name_max(dst.parent if dst.parent.is_dir() else Path(".")) - len(suffix.encode()) - 1
    name = dst.name
    while len(name.encode()) > room and name:
        name = name[:-1]
    return dst.with_name(f".{name}{suffix}")


def pid_running(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts; when unsure, it does)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but is not ours to signal
        return True
    return True


# ---------------------------------------------------------------------------------------------------------
# Removing, never raising
# ---------------------------------------------------------------------------------------------------------

def remove_quietly(path: Path) -> str | None:
    """Remove a file, link or folder tree; never raises. None when it is gone, else why it could not be removed."""
    try:
        if not os.path.lexists(path):  # (a read-only file system refuses even to unlink what is not there)
            return None
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as err:
        return f"could not remove {path}: {err.strerror or err}"
    except Exception as err:  # noqa: BLE001 - cleanup must not replace the error that caused it
        return f"could not remove {path}: {err}"
    return None


def remove_stale(dst: Path) -> list[str]:
    """Remove what an earlier, killed run into ``dst`` left: its temporaries (ours by name and for this OUT, and only
    when their process no longer runs). A previous OUT that such a run had moved aside is put back when OUT is
    missing, else removed. Returns one line per thing done (also logged)."""
    folder = dst.parent
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return []
    notes = []
    for entry in entries:
        match = _OURS.match(entry.name)
        if not match:
            continue
        tag, pid = match.group(1), int(match.group(2))
        if side_path(dst, tag, pid).name != entry.name or pid == os.getpid() or pid_running(pid):
            continue
        if tag == OLD_TAG and not os.path.lexists(dst):
            try:
                os.replace(entry, dst)
                notes.append(f"put back {dst}, which process {pid} (no longer running) had moved aside to {entry.name}")
            except OSError as err:
                notes.append(f"could not put back {dst} from {entry}: {err.strerror or err}")
        else:
            problem = remove_quietly(entry)
            notes.append(problem or f"removed {entry.name}, left by process {pid} (no longer running) in {folder}")
    for note in notes:
        log.warning("headroom: %s", note)
    return notes


# ---------------------------------------------------------------------------------------------------------
# OS errors as one line
# ---------------------------------------------------------------------------------------------------------

_ADVICE = {
    errno.EACCES: "permission denied: choose a folder you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose an OUT on a writable disk",
    errno.ENOSPC: "the disk is full: free some space or choose an OUT on another disk",
    errno.EDQUOT: "your disk quota is used up: free some space or choose an OUT on another disk",
    errno.EFBIG: "the file is too large for this file system (FAT32 stops at 4 GiB): choose an OUT on another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another OUT",
    errno.EISDIR: "a folder is in the way: choose another OUT",
    errno.EEXIST: "a file is in the way of a folder: choose another OUT",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter OUT",
    errno.ELOOP: "the path loops through symbolic links: choose another OUT",
    errno.ENOENT: "a folder of the path does not exist (or a link points nowhere): choose another OUT",
    errno.EIO: "the disk reported an I/O error: check the disk, or choose an OUT on another one",
    errno.EMLINK: "the folder holds too many entries: choose another OUT",
    errno.EXDEV: "the temporary and OUT are on different file systems: choose another OUT",
}


def _is_output_path(filename, dst: Path) -> bool:
    """Whether an OS error's file name is OUT, one of its folders, or one of our side paths or inside one."""
    path = Path(os.fsdecode(filename))
    if path == dst or path in dst.parents:
        return True
    return any(p.parent == dst.parent and _OURS.match(p.name) for p in (path, *path.parents))


def output_error(err: OSError, dst: Path, what: str = "write") -> OutputError:
    """An :class:`OutputError` for ``err``, raised while writing ``dst``: the path, the reason, what to do. An error
    about another file (the input vanished while it was read, say) names that file instead."""
    if isinstance(err, OutputError):
        return err
    if err.filename and not _is_output_path(err.filename, dst):
        return OutputError(f"{os.fsdecode(err.filename)}: {err.strerror or err}", err)
    advice = _ADVICE.get(err.errno) or f"{err.strerror or err}: choose another OUT"
    return OutputError(f"cannot {what} {dst}: {advice}", err)


def check_free_space(folder: Path, needed: int, dst: Path) -> None:
    """OutputError before anything is written when ``folder``'s disk has less than ``needed`` bytes (+ margin) free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < needed + FREE_SPACE_MARGIN:
        raise OutputError(f"cannot write {dst}: it needs {format_gib(needed)} and the disk has {format_gib(free)} "
                          f"free: free some space or choose an OUT on another disk",
                          OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


# ---------------------------------------------------------------------------------------------------------
# Folders this run creates, and the write itself
# ---------------------------------------------------------------------------------------------------------

def make_parents(folder: Path, dst: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those created, outermost first (removed again when the
    conversion fails). OutputError when a file is in the way or the disk refuses."""
    missing = []
    probe = folder
    while not probe.is_dir():
        if os.path.lexists(probe) and not probe.is_dir():
            raise OutputError(f"cannot write {dst}: {probe} is a file, not a folder: choose another OUT",
                              OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except OSError as err:
        remove_created(created)
        raise output_error(err, dst, "create the folder for") from None
    return created


def remove_created(folders: list[Path]) -> None:
    """Remove the (empty) folders :func:`make_parents` created, innermost first; never raises."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            pass


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system / OS can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``. A folder OUT that exists is moved aside first (a folder cannot be replaced in one
    rename), and put back when the second rename fails."""
    if not (tmp.is_dir() and dst.is_dir()):
        os.replace(tmp, dst)
        return
    old = side_path(dst, OLD_TAG)
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    remove_quietly(old)


def write_atomically(dst: Path, write: Callable[[Path], T], needed_bytes: int, folder: bool = False) -> T:
    """Run ``write(tmp)`` into a temporary file (or, with ``folder``, an empty temporary folder) next to ``dst``, then
    rename it into place; returns ``write``'s result. (Call :func:`remove_stale` first, before deciding whether
    ``dst`` exists: it may put back an OUT that a killed run had moved aside.)

    Before writing: the missing parent folders are created and the free space checked against ``needed_bytes``.
    On any failure the temporary and the created folders are removed (never raising), and an OSError becomes an
    :class:`OutputError` naming ``dst``.
    """
    if len(dst.name.encode()) > _name_max(dst.parent if dst.parent.is_dir() else Path(".")):
        raise output_error(OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG)), dst)  # before the work
    created = make_parents(dst.parent, dst)
    tmp = side_path(dst)
    try:
        remove_quietly(tmp)  # this process's own, from a call whose cleanup failed (it said so then)
        if folder:  # first: a read-only or foreign folder says so before the space is counted
            tmp.mkdir()
        else:
            tmp.open("xb").close()
        check_free_space(dst.parent, needed_bytes, dst)
        result = write(tmp)
        _move_into_place(tmp, dst)
    except BaseException as err:
        problem = remove_quietly(tmp)
        remove_created(created)
        if isinstance(err, OSError):
            failure = output_error(err, dst)
            if problem:
                failure = OutputError(f"{failure}; also {problem}", err)
            raise failure from None
        if problem:
            log.warning("headroom: %s", problem)
        raise
    _fsync_folder(dst.parent)
    return result
