"""Write small CIFAR-100 and CIFAR-10 archives in the official python formats for tests.

The official archive is a gzip tar with members `cifar-100-python/{train,test,meta}`, each a pickle
(protocol 2, bytes keys) holding `b'data'` (N x 3072 uint8, channel-major: the R, G and B planes of
a 32x32 image), `b'fine_labels'`, `b'coarse_labels'`, `b'filenames'` and `b'batch_label'`; `meta`
holds `b'fine_label_names'` and `b'coarse_label_names'`. The content is a pure function of
(num_train, num_test, seed, num_classes), so tests can compare what the data package returns with
`cifar100_arrays(...)`. Keyword knobs produce the broken archives the error-path tests need.

The official members were pickled by Python 2: byte strings as `str` (BINSTRING opcodes) and NumPy
arrays through `numpy.core.multiarray._reconstruct`. `python2_pickles=True` writes exactly that form;
the default is what Python 3 writes at protocol 2 (bytes through `_codecs.encode`, NumPy 2's
`numpy._core.multiarray`).

The CIFAR-10 archive `cifar-10-python.tar.gz` holds `cifar-10-batches-py/data_batch_1..5` (the
training images in five consecutive parts) and `test_batch`, each with `b'data'`, `b'labels'`,
`b'filenames'` and `b'batch_label'`, plus `batches.meta` with `b'label_names'`.
"""

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

ROOT = "cifar-100-python"
SPLITS = ("train", "test")


def fine_label_names(num_classes):
    return [f"fine_{i:03d}" for i in range(num_classes)]


def cifar100_arrays(num_train, num_test, seed=0, num_classes=100):
    """{"train": (images, labels), "test": (images, labels)}: images uint8 N x 3 x 32 x 32.

    Labels cycle through the classes (then shuffled), so every class has within one image of the
    same count, which the class-balance tests of the validation split rely on.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(SPLITS, (num_train, num_test)):
        images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
        labels = rng.permutation(np.arange(count) % num_classes).astype(np.int64)
        arrays[split] = (images, labels)
    return arrays


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: bytes and text (NumPy's dtype codes) become `str` opcodes,
    which Python 3 reads back as bytes with encoding='bytes'."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin1")
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str
    dispatch[str] = save_python2_str


def _dumps(value, python2):
    if not python2:
        return pickle.dumps(value, protocol=2)
    stream = io.BytesIO()
    _Python2Pickler(stream, protocol=2).dump(value)
    return stream.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _pickled_batch(split, images, labels, python2):
    count = len(labels)
    batch = {
        b"batch_label": f"{split} batch".encode(),
        b"fine_labels": [int(label) for label in labels],
        b"coarse_labels": [int(label) // 5 for label in labels],
        b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(count)],
        b"data": images.reshape(count, 3 * 32 * 32),
    }
    return _dumps(batch, python2)


def _pickled_meta(num_classes, python2):
    meta = {
        b"fine_label_names": [name.encode() for name in fine_label_names(num_classes)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range((num_classes + 4) // 5)],
    }
    return _dumps(meta, python2)


def write_cifar100_archive(
    path,
    num_train,
    num_test,
    seed=0,
    num_classes=100,
    *,
    omit_members=(),
    label_overrides=None,
    truncate_to_bytes=None,
    compresslevel=1,
    python2_pickles=False,
    member_payloads=None,
):
    """Write the archive to `path` and return it as a Path.

    omit_members: member basenames ("train", "test", "meta") to leave out.
    label_overrides: {split: {index: label}} written instead of the generated labels (e.g. an
        out-of-range label); `cifar100_arrays` still reports the generated ones.
    truncate_to_bytes: cut the finished file to this many bytes (a truncated download).
    python2_pickles: pickle the members as Python 2 did (the official file's form).
    member_payloads: {basename: bytes} written instead of the generated member (a crafted pickle).
    """
    path = Path(path)
    arrays = cifar100_arrays(num_train, num_test, seed, num_classes)
    members = {}
    for split in SPLITS:
        images, labels = arrays[split]
        labels = labels.copy()
        for index, label in (label_overrides or {}).get(split, {}).items():
            labels[index] = label
        members[split] = _pickled_batch(split, images, labels, python2_pickles)
    members["meta"] = _pickled_meta(num_classes, python2_pickles)
    members.update(member_payloads or {})

    _write_tar(path, ROOT, members, omit_members, compresslevel)
    if truncate_to_bytes is not None:
        with open(path, "r+b") as handle:
            handle.truncate(truncate_to_bytes)
    return path


CIFAR10_ROOT = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = 5


def cifar10_label_names(num_classes):
    return [f"label_{i}" for i in range(num_classes)]


def write_cifar10_archive(
    path, num_train, num_test, seed=0, num_classes=10, *, python2_pickles=False, omit_members=(), member_payloads=None
):
    """Write a CIFAR-10 archive whose images and labels are `cifar100_arrays(...)`; return its Path.

    The training images are split over data_batch_1..5 in order (sizes differing by at most one);
    omit_members and member_payloads work as for `write_cifar100_archive`.
    """
    path = Path(path)
    arrays = cifar100_arrays(num_train, num_test, seed, num_classes)
    images, labels = arrays["train"]
    members = {}
    for number, part in enumerate(np.array_split(np.arange(num_train), CIFAR10_TRAIN_BATCHES), start=1):
        members[f"data_batch_{number}"] = _cifar10_batch(images[part], labels[part], python2_pickles)
    members["test_batch"] = _cifar10_batch(*arrays["test"], python2_pickles)
    meta = {b"label_names": [name.encode() for name in cifar10_label_names(num_classes)], b"num_vis": 3072}
    members["batches.meta"] = _dumps(meta, python2_pickles)
    members.update(member_payloads or {})
    _write_tar(path, CIFAR10_ROOT, members, omit_members, compresslevel=1)
    return path


def _cifar10_batch(images, labels, python2):
    batch = {
        b"batch_label": b"a batch",
        b"labels": [int(label) for label in labels],
        b"filenames": [f"{i:05d}.png".encode() for i in range(len(labels))],
        b"data": images.reshape(len(labels), 3 * 32 * 32),
    }
    return _dumps(batch, python2)


def _write_tar(path, root, members, omit_members, compresslevel):
    with tarfile.open(path, "w:gz", compresslevel=compresslevel) as archive:
        directory = tarfile.TarInfo(root)
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        archive.addfile(directory)
        for name, payload in members.items():
            if name in omit_members:
                continue
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(payload)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(payload))
