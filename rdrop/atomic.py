"""Writing a result (a file or a whole folder) so that a crash or a full disk never leaves half of one.

The new version is written beside its target under a hidden name (`.<name>.partial`), flushed to disk
and only then renamed to the target's name. A rename within one folder is atomic, so whoever looks
finds either the previous complete version or the new complete one. Checkpoints, best weights,
exports, JSON results (`write_json`) and predict.py's results all go through `replacing`.

Nothing is written through a symbolic link, or over one: someone else may have planted it at a name
the project writes, to make a run overwrite the file it points to. `replacing` refuses a target that
is a link (a rename would not follow it, but would silently replace it), and the files a run keeps
open and writes in place (the folder lock, train.log, VisualDL records) are opened by `open_own`.
"""

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile

from rdrop.errors import UserError

PARTIAL_SUFFIX = ".partial"
OLD_SUFFIX = ".old"


def fsync_path(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path):
    if os.path.isdir(path):
        for name in os.listdir(path):
            _fsync_tree(os.path.join(path, name))
    fsync_path(path)


def remove(path):
    """Delete the file or folder at `path`, or the link itself if it is a symbolic link."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _beside(target, suffix):
    folder, name = os.path.split(os.path.abspath(target))
    return os.path.join(folder, f".{name}{suffix}")


def partial_path(target):
    """Where the next version of `target` is written before it replaces `target`."""
    return _beside(target, PARTIAL_SUFFIX)


def _planted_link(path):
    return UserError(
        f"'{path}' is a symbolic link (to '{os.readlink(path)}') at a name this project writes. It never "
        f"writes through or over a link, which someone else may have planted to make it overwrite the file "
        f"the link points to. Remove the link; to keep results elsewhere, point the path itself there."
    )


def refuse_link(path):
    """A UserError if `path` is a symbolic link (see the module's doc)."""
    if os.path.islink(path):
        raise _planted_link(path)


def open_own(path, flags, mode):
    """`path` opened with `os.open` `flags` and wrapped as a binary or text stream of `mode` (UTF-8),
    without following a symbolic link there (a UserError) and only if it is a regular file (a FIFO
    planted there would block the run: an OSError)."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _planted_link(path) from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return os.fdopen(descriptor, mode, encoding=None if "b" in mode else "utf-8")


@contextlib.contextmanager
def replacing(target):
    """Yields the path to write the new version of `target` to (create a file or a folder there).

    When the block ends without an exception, the new version is flushed to disk and takes the place
    of `target`; on any exception it is deleted and `target` stays as it was. OSError (disk full,
    permissions) reaches the caller, which knows what to tell the user. A `target` that is a symbolic
    link is refused with a UserError, before anything is written.
    """
    refuse_link(target)
    partial = partial_path(target)
    try:
        remove(partial)  # left over by a process killed mid-write
        yield partial
        _fsync_tree(partial)
        if os.path.isdir(partial) and os.path.isdir(target) and not os.path.islink(target):
            # os.replace cannot replace a non-empty folder: move the previous version aside first.
            old = _beside(target, OLD_SUFFIX)
            remove(old)
            os.replace(target, old)
            os.replace(partial, target)
            shutil.rmtree(old)
        else:
            os.replace(partial, target)
        fsync_path(os.path.dirname(os.path.abspath(target)))
    except BaseException:
        with contextlib.suppress(OSError):
            remove(partial)
        raise


def write_json(path, data, **dump_options):
    """Replace the file `path` with `data` as indented JSON; `dump_options` go to `json.dump`."""
    with replacing(path) as partial, open(partial, "w", encoding="utf-8") as stream:
        json.dump(data, stream, indent=2, **dump_options)
        stream.write("\n")


def _reason(error):
    return error.strerror or str(error)


def check_writable(target, name, is_folder=False):
    """A UserError now, before the work, if `replacing(target)` could not succeed after it: the folder
    that holds `target` cannot be created or written, or `target` exists and is of the other kind
    (file or folder) or may not be replaced, or is a symbolic link. `name` is what the message calls it
    (`--output`)."""
    refuse_link(target)
    try:
        folder = os.path.dirname(os.path.abspath(target))
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        if not os.path.lexists(target):
            return
        if os.path.isdir(target) != is_folder:
            code = errno.ENOTDIR if is_folder else errno.EISDIR
            raise OSError(code, os.strerror(code), target)
        if not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
    except OSError as error:
        kind = "folder" if is_folder else "file path"
        raise UserError(f"Cannot write {name} '{target}' ({_reason(error)}). Choose a writable {kind}.") from None


def write_error(name, target, error):
    """The UserError for an OSError raised inside `replacing(target)`."""
    return UserError(
        f"Could not write {name} '{target}' ({_reason(error)}). Free disk space or choose a writable "
        f"path; the previous version there, if any, is unchanged."
    )
