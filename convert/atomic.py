"""The output folder appears atomically: it is written as a temporary sibling, made durable, then renamed (or
swapped with the folder it replaces) in one step; temporaries of killed runs are removed by the next run.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConversionError
from .faults import Fault, no_fault
from .preflight import TMP_PREFIX, check_output, current_umask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_stem(output: Path) -> str:
    """The temporary folders' common prefix for ``output``: its name when short, else a digest of it, so that a
    temporary name (prefix, pid, random part, "-old") fits whenever the output's own name fits."""
    name = output.name
    if len(os.fsencode(name)) > 100:
        name = "h" + hashlib.sha256(os.fsencode(name)).hexdigest()[:24]
    return f"{TMP_PREFIX}{name}-"


# (st_dev, st_ino) of the folder this process is writing: a rename keeps it, so after the rename (or swap) it is
# what ``output`` is. Read by :func:`own_output_in_place` when an interrupt asks what is on disk.
_own_folder: tuple[int, int] | None = None


def own_output_in_place(output: Path) -> bool:
    """Whether ``output`` is the folder this process wrote (renamed or swapped into place), not a previous one."""
    try:
        st = os.stat(output)
    except OSError:
        return False
    return _own_folder == (st.st_dev, st.st_ino)


def remove_own_temporaries(output: Path) -> None:
    """This process's temporary folder for ``output`` (after a swap: the previous output it replaced). Not a
    ``-old`` one: that may hold the previous output mid-swap, which the next run puts back."""
    for p in output.parent.glob(f"{glob.escape(_tmp_stem(output))}{os.getpid()}-*"):
        if not p.name.endswith("-old"):
            shutil.rmtree(p, ignore_errors=True)


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete temporary folders that earlier, killed runs left beside ``output`` (their process is gone)."""
    removed = []
    stem = _tmp_stem(output)
    for p in sorted(output.parent.glob(f"{glob.escape(stem)}*")):
        m = re.fullmatch(re.escape(stem) + r"(\d+)-.*", p.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if p.name.endswith("-old") and not output.exists():
            os.rename(p, output)  # killed between the two renames of the fallback: put the old output back
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_directory(output: Path, force: bool, fault: Fault = no_fault) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it takes ``output``'s place in one atomic step.

    New output: one rename. Replacing (``force``): the new folder and the old output are swapped atomically
    (``renameat2(RENAME_EXCHANGE)``), then the old one, now at the temporary name, is deleted. A run killed at any
    moment leaves either no output or the previous complete output at ``output``; its temporary folder carries
    its pid and is deleted by the next run. On an error the temporary folder is removed and ``output`` untouched.
    ``fault`` is called at the points named in :mod:`convert.faults`.
    """
    check_output(output, force)
    remove_stale_temporaries(output)
    global _own_folder
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_stem(output)}{os.getpid()}-", dir=output.parent))
    st = os.stat(tmp)
    _own_folder = (st.st_dev, st.st_ino)
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the output folder follows the umask
        yield tmp
        fault("before_fsync")
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        fault("before_rename")
        if output.exists():
            if any(output.iterdir()) and not force:  # appeared while we were writing
                raise ConversionError(f"{output}: appeared while converting; pass --force to replace it")
            if not _exchange(tmp, output):  # no atomic swap here: move the old one aside, then the new one in
                aside = output.parent / f"{tmp.name}-old"
                os.rename(output, aside)
                try:
                    os.rename(tmp, output)
                except BaseException:
                    os.rename(aside, output)
                    raise
                tmp = aside
            fault("after_exchange")
            _fsync_dir(output.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old output
        else:
            os.rename(tmp, output)
            _fsync_dir(output.parent)
    except BaseException:
        if tmp.exists() and tmp != output:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
