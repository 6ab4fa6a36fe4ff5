"""Write a directory so that readers see either the old complete one or the new complete one.

Files are written into a fresh sibling `.NAME.tmp-XXXX` (same filesystem, so `rename` is atomic), each
fsynced, then the directory is renamed onto DST. Replacing an existing DST (`overwrite=True`, allowed only for
an empty folder or one of the converter's checkpoints: `check_replaceable`) swaps the two in one
`renameat2(RENAME_EXCHANGE)` on Linux, so DST names a complete checkpoint at every moment, and deletes the
old one afterwards. Where that call is missing or the filesystem refuses it, the old DST is moved aside first
and deleted only after the new one is in place (moved back if the install fails): there is then a moment
between the two renames where DST does not exist, but none where its data is lost (it is in `.NAME.old-XXXX`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from convert.errors import CheckpointError
from convert.files import not_a_checkpoint

logger = logging.getLogger("convert")


def fsync_dir(path: pathlib.Path) -> None:
    """Make a directory's entries (new names, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories: durability is then best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Write JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def check_replaceable(dst: pathlib.Path, overwrite: bool) -> None:
    """Refuse an existing `dst` that the write would replace: always without `overwrite` (FileExistsError),
    and with it unless `dst` is a symlink (only the link is replaced), an empty folder, or a folder of
    nothing but a checkpoint's files (`convert.files.not_a_checkpoint`; CheckpointError). A typo'd
    `--overwrite` destination such as a home folder is thus never deleted."""
    if not (dst.exists() or dst.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{dst} already exists: pass overwrite=True (--overwrite) to replace it")
    if not dst.is_symlink() and (reason := not_a_checkpoint(dst)):
        raise CheckpointError(f"destination {dst} {reason}: --overwrite replaces only an empty folder or a "
                              "checkpoint; choose another destination or remove it yourself")


def check_destination(src: str | os.PathLike[str], dst: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse, before anything is read, a `dst` that a conversion of `src` could not install or would destroy.

    Installing `dst` replaces the whole directory, so a `dst` that is or holds `src` would delete the source
    (and anything beside it) once converted, and one inside `src` would change it: `CheckpointError` naming
    both. An existing `dst` without `overwrite`, or with it one that is not a checkpoint: see
    `check_replaceable`. A `dst` whose parent is a file or not writable: the `OSError` that creating it would
    raise later, after minutes of reading.
    """
    src, dst = pathlib.Path(src), named_destination(dst)
    # Where the data really is: through symlinks and `..`. A `dst` that is itself a symlink is replaced as a
    # link (its target survives), so only the folder holding it is resolved.
    real_src = src.resolve()
    real_dst = dst.parent.resolve() / dst.name if dst.is_symlink() else dst.resolve()
    if real_src == real_dst:
        raise CheckpointError(f"destination {dst} is the source {src}: writing it would replace the source; "
                              "choose a destination outside it")
    if real_dst in real_src.parents:
        raise CheckpointError(f"destination {dst} contains the source {src}: replacing it would delete the source "
                              "(and all else in it); choose a destination outside it")
    if real_src in real_dst.parents:
        raise CheckpointError(f"destination {dst} is inside the source {src}: writing it would change the source; "
                              "choose a destination outside it")
    check_replaceable(dst, overwrite)
    # The temporary sibling is made in dst's parent (created if missing): its nearest existing ancestor
    # must be a directory we may write to.
    folder = next(p for p in dst.parents if p.exists())  # ends at "." or "/", which exist
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"not a directory (needed for {dst})", str(folder))
    # Made and removed, not asked: os.access says yes to root, and to folders (e.g. /proc) that refuse anyway.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{dst.name}.probe-", dir=folder))
    except OSError as exc:
        raise type(exc)(exc.errno, f"not a writable folder (needed for {dst}): {exc.strerror}", str(folder)) from None


def named_destination(dst: str | os.PathLike[str]) -> pathlib.Path:
    """`dst` with a name of its own: "." or ".." (no name, or one that is not the folder's) become the absolute
    folder, since the temporary sibling is named after it and must lie beside it, not inside it."""
    dst = pathlib.Path(dst)
    if dst.name in ("", ".."):
        dst = dst.resolve()
        if not dst.name:
            raise CheckpointError(f"cannot write a checkpoint at {dst}: it replaces the folder, which must have a parent")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike[str], overwrite: bool = False,
                     extra_files: Iterable[str | os.PathLike[str]] = ()) -> Iterator[pathlib.Path]:
    """Yield an empty temporary directory; on success it becomes `dst`, on any error it is removed.
    `extra_files` (e.g. the tokenizer, or a trained model's task.json) are copied in beside what the caller
    wrote, inside the same atomic write.

    Refuses an existing `dst` without `overwrite`, and with it one that is not a checkpoint
    (`check_replaceable`); the old `dst` survives any failure.
    """
    dst = named_destination(dst)
    check_replaceable(dst, overwrite)  # fail before spending time on a write that cannot be installed
    missing = [folder for folder in dst.parents if not folder.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    for folder in reversed(missing):  # a new folder's name is durable once its parent is synced
        fsync_dir(folder.parent)
    _warn_about_leftovers(dst)
    tag = uuid.uuid4().hex[:8]
    tmp = dst.parent / f".{dst.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for extra in extra_files:
            shutil.copyfile(extra, tmp / pathlib.Path(extra).name)
        for child in tmp.iterdir():
            if child.is_file():  # writers fsync their own files; this covers any that did not
                with open(child, "rb+") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        _install(tmp, dst, overwrite, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _warn_about_leftovers(dst: pathlib.Path) -> None:
    """Name the temporary folders a killed write left beside `dst` (SIGKILL or power loss run no cleanup).
    Not removed here: another process may be writing one right now."""
    leftovers = sorted(dst.parent.glob(f".{glob.escape(dst.name)}.tmp-*")) + sorted(
        dst.parent.glob(f".{glob.escape(dst.name)}.old-*"))
    if leftovers:
        logger.warning("left by an interrupted write to %s (delete them if no other conversion is running): %s",
                       dst, ", ".join(str(p) for p in leftovers))


def _install(tmp: pathlib.Path, dst: pathlib.Path, overwrite: bool, tag: str) -> None:
    check_replaceable(dst, overwrite)  # it may have appeared, or been filled, while we were writing
    if (dst.exists() or dst.is_symlink()) and _exchange(tmp, dst):
        fsync_dir(dst.parent)
        _remove(tmp)  # now the old one
        return
    old = dst.parent / f".{dst.name}.old-{tag}"
    had_old = dst.exists() or dst.is_symlink()
    if had_old:
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if had_old:
            os.rename(old, dst)
        raise
    fsync_dir(dst.parent)
    if had_old:
        _remove(old)


def _remove(path: pathlib.Path) -> None:
    """Delete a replaced destination: a folder with what is in it, a link without its target."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
_RENAME_EXCHANGE = 2  # <linux/fs.h>
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    _renameat2.restype = ctypes.c_int


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap the two existing paths in one atomic step; False where the C library or the filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or filesystem without RENAME_EXCHANGE
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
