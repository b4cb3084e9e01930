"""CIFAR-10 and CIFAR-100 from the official python archives, read without running code from the file.

The archives' members are Python pickles, and a pickle can call any importable function while it is
read, so a crafted archive would run code (Paddle's `Cifar10`/`Cifar100` classes, and a plain
`pickle.load`, do exactly that). `_RestrictedUnpickler` resolves only the handful of names the
official members contain (NumPy arrays of numbers, and the bytes helper of Python 3 pickles) and
refuses any other with a `UserError` before calling it. This module also locates or downloads the
archive, turns every way a bad file can fail into a `UserError` naming the file, and reads the class
names from the archive's meta member. `ARCHIVES` holds what differs between the two archives.

Size bombs are refused by the dataset's known shape: a member may hold at most the images of its part
of the official archive (3072 bytes each, stored in at most twice that) and their labels, and no
array may declare more bytes than the member holds (a NumPy array with stride 0, built from the
allowed names, can declare 10^8 images in 200 bytes). A gzip archive is read through a byte limit
above the largest size the official archive can take uncompressed, so a member that expands to
gigabytes is cut off before it is held in memory.
"""

import codecs
import gzip
import logging
import math
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

from rdrop.errors import UserError

import numpy as np
import paddle.dataset.common
from paddle.vision.datasets.cifar import CIFAR10_MD5, CIFAR10_URL, CIFAR100_MD5, CIFAR100_URL

logger = logging.getLogger(__name__)

IMAGE_SIDE = 32
IMAGE_BYTES = 3 * IMAGE_SIDE * IMAGE_SIDE
# Both archives: 50,000 training and 10,000 test images.
SPLIT_IMAGES = {"train": 50_000, "test": 10_000}
# The most a member may hold per image: its pixels twice over (Python 3 pickles bytes at protocol 2 as
# latin-1 text, UTF-8 encoded, so a byte above 127 takes two), plus its label, file name (about 30
# bytes) and pickle framing, with room to spare. The meta members are a few kilobytes.
MEMBER_BYTES_PER_IMAGE = 2 * IMAGE_BYTES + 256
MEMBER_SLACK_BYTES = 1 << 20
HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
# paddle.dataset.common.download() stores a file under DATA_HOME/<module name>/<URL basename>.
PADDLE_CACHE_MODULE = "cifar"


@dataclass(frozen=True)
class Archive:
    """Where one official archive keeps its splits, labels and class names."""

    title: str  # for messages
    file_name: str
    url: str
    md5: str
    member_root: str
    train_members: tuple  # concatenated in this order
    test_members: tuple
    labels_key: bytes
    meta_member: str
    names_key: bytes

    def member(self, name):
        return f"{self.member_root}/{name}"

    def split_members(self, split):
        return self.train_members if split == "train" else self.test_members

    def member_images(self, name):
        """How many images member `name` holds in the official archive (0 for the meta member)."""
        for split in SPLIT_IMAGES:
            if name in self.split_members(split):
                return SPLIT_IMAGES[split] // len(self.split_members(split))
        return 0

    def member_byte_limit(self, name):
        return self.member_images(name) * MEMBER_BYTES_PER_IMAGE + MEMBER_SLACK_BYTES

    def byte_limit(self):
        """Above the official archive's uncompressed size: its members and their tar headers."""
        names = self.train_members + self.test_members + (self.meta_member,)
        return sum(self.member_byte_limit(name) for name in names) + MEMBER_SLACK_BYTES

    def members(self):
        """Every member the official archive holds, for messages."""
        names = self.train_members + self.test_members + (self.meta_member,)
        return ", ".join(self.member(name) for name in names)


ARCHIVES = {
    "cifar10": Archive(
        title="CIFAR-10",
        file_name="cifar-10-python.tar.gz",
        url=CIFAR10_URL,
        md5=CIFAR10_MD5,
        member_root="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        labels_key=b"labels",
        meta_member="batches.meta",
        names_key=b"label_names",
    ),
    "cifar100": Archive(
        title="CIFAR-100",
        file_name="cifar-100-python.tar.gz",
        url=CIFAR100_URL,
        md5=CIFAR100_MD5,
        member_root="cifar-100-python",
        train_members=("train",),
        test_members=("test",),
        labels_key=b"fine_labels",
        meta_member="meta",
        names_key=b"fine_label_names",
    ),
}


def default_archive_path(archive):
    return Path(paddle.dataset.common.DATA_HOME) / PADDLE_CACHE_MODULE / archive.file_name


def resolve_archive(archive, data_file, download):
    """The path of a readable `archive`, downloading it into Paddle's cache if allowed and needed.

    data_file=None means Paddle's cache location; with download=True Paddle checks the MD5 of the
    cached file and (re-)downloads it when it is missing or different.
    """
    if data_file is not None:
        path = Path(data_file).expanduser()
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise UserError(
                f"data.data_file {path} {what}. Point data.data_file at the {archive.title} archive "
                f"{archive.file_name} (from {HOMEPAGE}), or set data.data_file: null and "
                f"data.download: true to let Paddle download it into {default_archive_path(archive)}."
            )
        return path
    cached = default_archive_path(archive)
    if not download:
        if cached.is_file():
            return cached
        raise UserError(
            f"{archive.title} archive not found at {cached} (Paddle's cache, used because data.data_file "
            f"is null) and data.download is false. Set data.download: true, or download "
            f"{archive.file_name} from {HOMEPAGE} and put it there or point data.data_file at it."
        )
    try:
        return Path(paddle.dataset.common.download(archive.url, PADDLE_CACHE_MODULE, archive.md5))
    except Exception as error:  # Paddle retries internally and then raises whatever it last hit
        raise UserError(
            f"Could not download {archive.title} from {archive.url} into {cached} "
            f"({_describe(error)}). Check the network, or download {archive.file_name} "
            f"from {HOMEPAGE} by hand and set data.data_file to its path."
        ) from error


def _latin1_bytes(text, encoding):
    """`_codecs.encode` as Python 3 pickles of bytes use it (protocol 2), for latin-1 only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numeric_dtype(*args):
    """`numpy.dtype`, except that object arrays (which would unpickle arbitrary items) are refused."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"a NumPy array of Python objects (dtype {dtype})")
    return dtype


# The function NumPy pickles its arrays with (numpy.core.multiarray._reconstruct in Python 2's NumPy,
# numpy._core.multiarray._reconstruct in NumPy 2), taken from NumPy itself whatever its version.
_reconstruct = np.zeros(0).__reduce__()[0]

# Everything the official members (pickled by Python 2 NumPy) and the same data pickled by Python 3
# need to construct: arrays of numbers and bytes. Nothing else is importable from the file.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _RefusedGlobal(Exception):
    """The pickle asked for a name outside _ALLOWED_GLOBALS."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return allowed


class _ByteLimitedStream:
    """The decompressed bytes of a gzip archive, for tarfile, ending in a UserError once a read or seek
    passes `limit`: a file that expands beyond the official archive is cut off, not held."""

    def __init__(self, stream, limit, refuse):
        self._stream, self._limit, self._refuse = stream, limit, refuse

    def read(self, size=-1):
        allowed = self._limit + 1 - self._stream.tell()
        data = self._stream.read(allowed if size is None or size < 0 else min(size, allowed))
        if self._stream.tell() > self._limit:
            self._refuse()
        return data

    def seek(self, offset, whence=0):
        target = {0: 0, 1: self._stream.tell()}.get(whence)
        if target is not None and target + offset > self._limit:
            self._refuse()
        return self._stream.seek(offset, whence)

    def tell(self):
        return self._stream.tell()


def _open_archive(archive, path):
    """`path` as an open tarfile; a gzip file (the official form) decompressed through a byte limit."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if not gzipped:
        return tarfile.open(path, mode="r")

    def refuse():
        raise UserError(
            f"{path} expands to more than {archive.byte_limit():,} bytes, beyond the official "
            f"{archive.file_name} ({archive.title}: {sum(SPLIT_IMAGES.values()):,} images of {IMAGE_BYTES} "
            f"bytes with their labels), so it was cut off there: the file was crafted or is not the "
            f"official archive. Download it again (MD5 {archive.md5}) from {HOMEPAGE}, or set "
            f"data.data_file: null and data.download: true."
        )

    return tarfile.open(fileobj=_ByteLimitedStream(gzip.open(path, "rb"), archive.byte_limit(), refuse), mode="r:")


_DATA_TYPES = (np.ndarray, bytes, bytearray, str, dict, list, tuple)


def _declared_bytes(value, budget):
    """What `value` declares: an array's bytes and a bytes object's length per reference, and 1 per
    item of a list, tuple or dict; counting stops once it exceeds `budget`. A list, tuple or dict
    referenced twice (a pickle can nest one list in itself, or repeat it a million times for a few
    bytes) declares without bound; the official members share nothing."""
    total, pending, expanded = 0, [value], set()
    while pending and total <= budget:
        item = pending.pop()
        if isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, (bytes, bytearray, str)):
            total += len(item)
        elif isinstance(item, (dict, list, tuple)) and item:
            if id(item) in expanded:
                return math.inf
            expanded.add(id(item))
            total += len(item)
            pending.extend(
                child for child in (item.values() if isinstance(item, dict) else item) if isinstance(child, _DATA_TYPES)
            )
    return total


def _refuse_crafted(archive, path, member, what):
    raise UserError(
        f"{path} member {member} {what}: the file was crafted or is not the official {archive.file_name}, "
        f"and it was not read any further. Download the archive again from {HOMEPAGE} (MD5 "
        f"{archive.md5}) or set data.data_file: null and data.download: true."
    )


def _unpickle_member(archive, path, tar, name):
    """Member `name` of the open `tar`, unpickled with only the allowed names; None if absent. A member
    larger than the official one is refused before it is read."""
    member = archive.member(name)
    try:
        info = tar.getmember(member)
    except KeyError:
        return None
    if not info.isfile():  # a link would read another member's bytes past the size check below
        _refuse_crafted(archive, path, member, "is a link or a special file, where the official archive has data")
    if info.size > archive.member_byte_limit(name):
        _refuse_crafted(
            archive,
            path,
            member,
            f"holds {info.size:,} bytes, more than a member of {archive.member_images(name):,} images of "
            f"{IMAGE_BYTES} bytes can take ({archive.member_byte_limit(name):,})",
        )
    try:
        batch = _RestrictedUnpickler(tar.extractfile(info), encoding="bytes").load()
    except _RefusedGlobal as refused:
        _refuse_crafted(
            archive,
            path,
            member,
            f"asks to run {refused} while it is read, which the {archive.title} archive never does",
        )
    if _declared_bytes(batch, info.size) > info.size:
        _refuse_crafted(
            archive,
            path,
            member,
            f"declares more data than its {info.size:,} bytes hold (an array without its data, or a list "
            f"referenced over and over)",
        )
    return batch


def read_split(archive, path, split):
    """uint8 N x 3 x 32 x 32 images and int64 labels of `split` ("train" or "test"), in member order."""
    images, labels = [], []
    try:
        with _open_archive(archive, path) as tar:
            for name in archive.split_members(split):
                member = archive.member(name)
                batch = _unpickle_member(archive, path, tar, name)
                if batch is None:
                    raise UserError(
                        f"{path} has no member {member}: it is not the {archive.title} python archive "
                        f"{archive.file_name} (which holds {archive.members()}). Download it from "
                        f"{HOMEPAGE} or fix data.data_file."
                    )
                batch_labels = np.asarray(batch[archive.labels_key], dtype=np.int64)
                batch_images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)
                if len(batch_images) > archive.member_images(name):
                    _refuse_crafted(
                        archive,
                        path,
                        member,
                        f"holds {len(batch_images):,} images, more than the official "
                        f"member's {archive.member_images(name):,}",
                    )
                if len(batch_images) != len(batch_labels):
                    raise UserError(
                        f"{path} member {member} holds {len(batch_images)} images but {len(batch_labels)} "
                        f"labels: the file is corrupt. Download it again (MD5 {archive.md5}) from {HOMEPAGE}."
                    )
                images.append(batch_images)
                labels.append(batch_labels)
    except UserError:
        raise
    except Exception as error:
        # Unpickling arbitrary bytes can raise nearly any exception type; everything inside this
        # block is reading the user's file, so any failure here is a problem with that file.
        raise UserError(
            f"Could not read {path} as the {archive.title} archive {archive.file_name} "
            f"({_describe(error)}). The file is truncated, corrupt or in another "
            f"format; download it again (MD5 {archive.md5}) from {HOMEPAGE}, or set "
            f"data.data_file: null and data.download: true."
        ) from error
    return np.concatenate(images), np.concatenate(labels)


def read_class_names(archive, path, num_classes):
    """Label names from the meta member, or "class_<i>" when it is missing or unreadable."""
    member = archive.member(archive.meta_member)
    try:
        with _open_archive(archive, path) as tar:
            meta = _unpickle_member(archive, path, tar, archive.meta_member)
        names = tuple(name.decode() for name in meta[archive.names_key])
    except UserError:
        raise  # a meta that tries to run code condemns the whole file, not just the names
    except Exception as error:  # a missing meta only costs readable names in reports
        logger.warning("%s: no usable %s (%s); naming classes class_<i>", path, member, _describe(error))
        return tuple(f"class_{i}" for i in range(num_classes))
    return names


def _describe(error):
    """The exception as one line: messages must stay one paragraph, and tarfile's are multi-line."""
    return " ".join(f"{type(error).__name__}: {error}".split())
