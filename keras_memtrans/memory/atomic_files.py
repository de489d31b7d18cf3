"""Files written atomically, and `.npz` files read back with checks.

Every file the package writes (memories, lane states, checkpoints, results)
goes through `atomic_write`: a temporary file in the same directory,
flushed, fsynced and renamed onto its path, so a reader (or a run resumed
after a kill) sees the old file or the complete new one. A directory
written by another library (a keras-hub preset) goes through
`atomic_directory` the same way.
"""

import errno
import os
import shutil
import tempfile
import zipfile

import numpy as np


def _fsync_directory(directory):
    """Makes the entries of `directory` (a rename, a new file) durable."""
    if os.name != "posix":  # directories cannot be opened elsewhere
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_directories(directory):
    """Creates the absolute path `directory` and its missing parents, each
    made durable in its parent."""
    if os.path.isdir(directory):
        return
    parent = os.path.dirname(directory)
    make_directories(parent)
    try:
        os.mkdir(directory)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise
    _fsync_directory(parent)


def atomic_write(path, write):
    """Writes the file `path` atomically; missing directories are created.

    `write(file)` writes the contents to a binary file object: a temporary
    file in the same directory (`.<name>.<random>.tmp`), which is then
    flushed, fsynced and renamed onto `path` (`os.replace`), and the
    directory is fsynced. A reader sees the old file or the complete new
    one, never a partial write; a `write` that raises leaves the old file
    and no temporary file (a killed process can leave its temporary file,
    never a partial `path`).

    Args:
        path: the file to write, exactly (no suffix is added).
        write: a function of a binary file object, writing the contents.

    Example:
    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     path = os.path.join(directory, "new", "greeting.txt")
    ...     atomic_write(path, lambda file: file.write(b"hello"))
    ...     with open(path, "rb") as file:
    ...         print(file.read(), os.listdir(os.path.dirname(path)))
    b'hello' ['greeting.txt']
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    make_directories(directory)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # an ordinary file, not mkstemp's 0600
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.remove(temporary)
        raise
    _fsync_directory(directory)


def atomic_directory(path, write):
    """Writes the directory `path` whole, or leaves what was there.

    `write(directory)` fills a new hidden sibling (`.<name>.partial`), whose
    files are then fsynced and which is renamed onto `path`. An existing
    `path` is first renamed aside (`.<name>.previous`) and deleted once the
    new directory is in place: a `write` that raises, or an exception
    between the renames, leaves `path` as it was, and a kill leaves the old
    directory or the new one (between the two renames, the old one as
    `.<name>.previous`). The caller decides whether an existing `path` may
    be replaced.

    Args:
        path: the directory to write.
        write: a function of the directory path (a str) to fill.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    make_directories(parent)
    partial = os.path.join(parent, f".{name}.partial")
    previous = os.path.join(parent, f".{name}.previous")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed write left
    os.mkdir(partial)
    try:
        write(partial)
        fsync_tree(partial)
        if os.path.exists(path):
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(path, previous)
        os.rename(partial, path)
    except BaseException:
        if os.path.exists(previous) and not os.path.exists(path):
            os.rename(previous, path)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _fsync_directory(parent)
    shutil.rmtree(previous, ignore_errors=True)


def fsync_tree(directory):
    """Makes every file and directory under `directory` durable."""
    for root, _, names in os.walk(directory, topdown=False):
        for name in names:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_directory(root)


def atomic_save_npz(path, arrays):
    """Writes the NumPy `arrays` (a dict) to the `.npz` file `path` with
    `atomic_write` (no `.npz` suffix is added)."""
    atomic_write(path, lambda file: np.savez(file, **arrays))


def read_npz(path):
    """All arrays of the `.npz` file `path`, as a dict.

    Raises:
        FileNotFoundError: there is no file at `path`.
        ValueError: the file is not a readable `.npz` (e.g. truncated).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "No saved state at", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path!r} is not a readable .npz file: {error}") from error


def checked_array(arrays, name, shape, dtype, path):
    """`arrays[name]`, read from the file `path`, as `dtype`.

    Raises a ValueError naming `name` and `path` if the array is missing,
    has another shape than `shape` or a dtype of another kind.
    """
    if name not in arrays:
        raise ValueError(f"{path!r} has no `{name}` array.")
    array = np.asarray(arrays[name])
    if array.shape != tuple(shape):
        raise ValueError(
            f"The saved `{name}` in {path!r} has shape {array.shape}, "
            f"this state's {tuple(shape)}."
        )
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise ValueError(
            f"The saved `{name}` in {path!r} is {array.dtype}, not {dtype}."
        )
    return array.astype(dtype)
