"""Image files as datasets: class-per-folder trees and PaddleClas file lists, indexed once at start.

`folder` (torchvision's ImageFolder layout, ImageNet's train/ and val/): the classes are the
training folder's sub-folder names in sorted order, the same mapping for the test folder; a
class's images are the files with an image extension anywhere below its sub-folder (symlinks
followed, names starting with "." skipped). `filelist` (PaddleClas): `relative/path label` per
line, paths relative to `data.root`, labels integers; an optional `id name` file names the classes.

The index is a pure function of the file names and list contents: sorted, so identical on every
rank. It holds the paths as one bytes object plus offsets rather than a million Python strings, so
the loader workers forked from a process share it instead of copying it page by page as reference
counts change (what makes per-worker memory grow with the dataset in a list-of-strings index).

`check_files` is the start-of-run validation (see its doc for what it reads of each file).
"""

import errno
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from rdrop.errors import UserError

import numpy as np
from PIL import Image

# What torchvision's ImageFolder and Paddle's DatasetFolder accept, compared case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# A file whose format has no cheap end-of-file check below is decoded whole at start.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
_END_SEARCH_BYTES = 64
PROBLEMS_SHOWN = 5


@dataclass(frozen=True)
class FileSet:
    """Image files with int64 labels: what `folder` and `filelist` reduce to (like `ImageSet`)."""

    root: str
    names: bytes  # the paths relative to root, os.fsencode'd and concatenated
    offsets: np.ndarray  # int64, len + 1: path i is names[offsets[i]:offsets[i + 1]]
    labels: np.ndarray
    class_names: tuple
    source: str  # for messages: the folder or list the files come from
    lines: np.ndarray | None = None  # for lists: the 1-based line of each file, for messages

    @classmethod
    def from_paths(cls, root, relative_paths, labels, class_names, source, lines=None):
        encoded = [os.fsencode(path) for path in relative_paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=offsets[1:])
        return cls(
            root,
            b"".join(encoded),
            offsets,
            np.asarray(labels, dtype=np.int64),
            tuple(class_names),
            source,
            None if lines is None else np.asarray(lines, dtype=np.int64),
        )

    def __len__(self):
        return len(self.labels)

    def relative_path(self, index):
        return os.fsdecode(self.names[self.offsets[index] : self.offsets[index + 1]])

    def path(self, index):
        return os.path.join(self.root, self.relative_path(index))

    def describe(self, index):
        """Where image `index` comes from, for messages."""
        if self.lines is None:
            return self.path(index)
        return f"{self.source} line {self.lines[index]} ({self.path(index)})"

    def digest(self):
        """SHA-256 of the relative paths and labels, in order: what a resume must find unchanged."""
        hasher = hashlib.sha256(self.names)
        hasher.update(self.offsets.tobytes())
        hasher.update(self.labels.tobytes())
        return hasher.hexdigest()

    def subset(self, indices):
        indices = np.arange(len(self))[indices]
        return FileSet.from_paths(
            self.root,
            [self.relative_path(i) for i in indices],
            self.labels[indices],
            self.class_names,
            self.source,
            None if self.lines is None else self.lines[indices],
        )


def index_folders(train_dir, test_dir, num_classes):
    """{"train": FileSet, "test": FileSet} of the two class-per-folder trees."""
    classes = _class_folders(train_dir, "data.train_dir")
    label_of = {name: label for label, name in enumerate(classes)}
    train = _folder_set(train_dir, classes, label_of, classes)  # an empty class folder is named first
    if len(classes) != num_classes:
        raise UserError(
            f"data.train_dir {train_dir} has {len(classes)} class folders ({_shown(classes)}) but "
            f"model.num_classes is {num_classes}. Set model.num_classes: {len(classes)}, or point "
            "data.train_dir at the folder whose sub-folders are the classes."
        )
    test_classes = _class_folders(test_dir, "data.test_dir")
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise UserError(
            f"data.test_dir {test_dir} has class folders that data.train_dir {train_dir} does not "
            f"have: {_shown(unknown)}. The model can only predict the training classes; rename or "
            "remove those folders, or add them to the training folder."
        )
    return {"train": train, "test": _folder_set(test_dir, test_classes, label_of, classes)}


def read_file_lists(root, train_list, test_list, class_names_file, num_classes):
    """{"train": FileSet, "test": FileSet} of two PaddleClas lists of files under `root`."""
    if class_names_file is None:
        names = None
    else:
        names = read_class_names_file(class_names_file)
        if len(names) != num_classes:
            raise UserError(
                f"data.class_names_file {class_names_file} names {len(names)} classes but "
                f"model.num_classes is {num_classes}. Set model.num_classes: {len(names)}, or fix the file."
            )
    if not os.path.isdir(root):
        raise UserError(
            f"data.root {root} is not a folder. Set it to the folder the paths in data.train_list and "
            "data.test_list are relative to (PaddleClas's image_root)."
        )
    train = _read_list(train_list, "data.train_list", num_classes)
    found = max(train[1]) + 1
    if names is None and found != num_classes:
        raise UserError(
            f"data.train_list {train_list} has labels 0..{found - 1}, i.e. {found} classes, but "
            f"model.num_classes is {num_classes}. Set model.num_classes: {found}, or give the class "
            "names with data.class_names_file to declare classes the training list lacks."
        )
    names = names or tuple(str(label) for label in range(num_classes))
    test = _read_list(test_list, "data.test_list", num_classes)
    return {
        "train": FileSet.from_paths(root, *train[:2], names, train_list, train[2]),
        "test": FileSet.from_paths(root, *test[:2], names, test_list, test[2]),
    }


def read_class_names_file(path):
    """Class names from a PaddleClas class_id_map_file: `id name` per line, ids 0..n-1 once each."""
    text = _read_text(path, "data.class_names_file")
    names = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, _, name = line.strip().partition(" ")
        if not _is_label(label) or not name.strip() or int(label) in names:
            problem = "repeats an id" if _is_label(label) and int(label) in names else "is not `id name`"
            raise UserError(
                f"data.class_names_file {path} line {number} ({line.strip()[:80]!r}) {problem}. Each "
                "line holds a class id (0, 1, ...) and its name, separated by a space, as PaddleClas's "
                "class_id_map_file."
            )
        names[int(label)] = name.strip()
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise UserError(
            f"data.class_names_file {path} has no line for class id(s) {_shown(missing)}; it must name "
            "every id from 0 to the highest one once."
        )
    return tuple(names[label] for label in range(len(names)))


def check_files(file_set, processes):
    """Raise a UserError naming the files (or list lines) of `file_set` that cannot be trained on.

    Every file is opened: its header must be an image Pillow reads, and a JPEG or PNG must end with
    its end marker (a truncated copy does not). A JPEG or PNG without it, and any other format, is
    decoded whole, so only suspicious or rare files cost a decode at start. Corruption inside the
    compressed data can only show when the image is decoded during the run (see data/loader.py).
    """
    indices = range(len(file_set))
    chunk = max(1, len(file_set) // (processes * 8))
    if processes > 1 and len(file_set) > chunk:
        with ProcessPoolExecutor(processes) as pool:
            problems = list(pool.map(_problem_with, map(file_set.path, indices), chunksize=chunk))
    else:
        problems = [_problem_with(file_set.path(i)) for i in indices]
    bad = [(i, problem) for i, problem in zip(indices, problems) if problem]
    if bad:
        shown = "; ".join(f"{file_set.describe(i)} {problem}" for i, problem in bad[:PROBLEMS_SHOWN])
        more = f" (and {len(bad) - PROBLEMS_SHOWN} more)" if len(bad) > PROBLEMS_SHOWN else ""
        raise UserError(
            f"{len(bad)} of the {len(file_set)} images of {file_set.source} cannot be used: {shown}{more}. "
            "Replace or remove these files (and their list lines), then start again."
        )


def _problem_with(path):
    """None if the file at `path` looks like a whole image, else what is wrong with it."""
    try:
        stream = open(path, "rb")
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop"
        return "does not exist" if error.errno == errno.ENOENT else f"cannot be read ({error.strerror})"
    with stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            return "is empty (0 bytes)"
        try:
            with Image.open(stream) as image:
                marker = _END_MARKERS.get(image.format)
                if marker is not None:
                    stream.seek(max(0, size - _END_SEARCH_BYTES))
                    if marker in stream.read():
                        return None
                image.load()
        except Image.DecompressionBombError:
            return "has more pixels than Pillow's decompression-bomb limit"
        except (OSError, ValueError, SyntaxError, EOFError) as error:  # Pillow's ways to reject a file
            return f"is not a readable image ({type(error).__name__}: {' '.join(str(error).split())})"
    return None


def _class_folders(folder, key):
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise UserError(
            f"{key} {folder} cannot be listed ({error.strerror}). Point {key} at a folder with one "
            "sub-folder of images per class."
        ) from None
    classes = sorted(entry.name for entry in entries if not entry.name.startswith(".") and entry.is_dir())
    if not classes:
        raise UserError(
            f"{key} {folder} has no sub-folders. The folder layout needs one sub-folder per class "
            "holding that class's images (folder/cat/1.jpg, folder/dog/2.jpg, ...)."
        )
    return classes


def _folder_set(folder, classes, label_of, class_names):
    paths, labels = [], []
    for name in classes:
        found = _image_files(os.path.join(folder, name), name)
        if not found:
            raise UserError(
                f"Class folder {os.path.join(folder, name)} holds no image files (extensions "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case). Add its images or remove the folder."
            )
        paths += found
        labels += [label_of[name]] * len(found)
    return FileSet.from_paths(folder, paths, labels, class_names, folder)


def _image_files(class_folder, prefix):
    """Sorted paths (relative to the class folder's parent) of the image files below `class_folder`."""
    found = []
    pending = [(class_folder, prefix, frozenset({_identity(class_folder)}))]
    while pending:
        folder, relative, ancestors = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            raise UserError(f"Folder {folder} cannot be listed ({error.strerror}). Fix its permissions.") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            inside = f"{relative}/{entry.name}"
            if entry.is_dir():
                identity = _identity(entry.path)
                if identity in ancestors:
                    raise UserError(
                        f"{entry.path} leads back to {os.path.realpath(entry.path)}, a folder that "
                        "contains it: a symlink loop, which would list the same images endlessly. "
                        "Remove or fix that symlink."
                    )
                pending.append((entry.path, inside, ancestors | {identity}))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(inside)
    return sorted(found)


def _identity(folder):
    stat = os.stat(folder)
    return stat.st_dev, stat.st_ino


def _read_list(path, key, num_classes):
    """(relative paths, labels, line numbers) of the list at `path`; labels checked against num_classes."""
    text = _read_text(path, key)
    paths, labels, lines = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)
        if len(fields) != 2 or not _is_label(fields[1]) or int(fields[1]) >= num_classes:
            problem = (
                f"has label {fields[1]}, not below model.num_classes ({num_classes})"
                if len(fields) == 2 and _is_label(fields[1])
                else "is not `relative/path label` with an integer label"
            )
            raise UserError(
                f"{key} {path} line {number} ({line.strip()[:80]!r}) {problem}. Each line holds an image "
                f"path relative to data.root and its class id in [0, {num_classes}), as PaddleClas lists do."
            )
        paths.append(fields[0])
        labels.append(int(fields[1]))
        lines.append(number)
    if not paths:
        raise UserError(f"{key} {path} lists no images. Each line holds `relative/path label`.")
    return paths, labels, lines


def _read_text(path, key):
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{key} {path} cannot be read as UTF-8 text ({error}). Check the path.") from None


def _is_label(text):
    return text.isascii() and text.isdigit()


def _shown(names, limit=10):
    listed = ", ".join(str(name) for name in names[:limit])
    return listed + (f", ... ({len(names)} in all)" if len(names) > limit else "")
