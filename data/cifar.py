"""CIFAR-100's python archive (`cifar-100-python.tar.gz`), read without running code from the file.

The archive's members are Python pickles, and a pickle can call any importable function while it is
read, so a crafted archive would run code (Paddle's `Cifar100` class, and a plain `pickle.load`, do
exactly that). `_RestrictedUnpickler` resolves only the handful of names the official members
contain (NumPy arrays of numbers, and the bytes helper of Python 3 pickles) and refuses any other
with a `UserError` before calling it. This module also locates or downloads the archive, turns every
way a bad file can fail into a `UserError` naming the file, and reads the class names from `meta`.
"""

import codecs
import logging
import pickle
import tarfile
from pathlib import Path

from rdrop.errors import UserError

import numpy as np
import paddle.dataset.common
from paddle.vision.datasets.cifar import CIFAR100_MD5, CIFAR100_URL

logger = logging.getLogger(__name__)

ARCHIVE_NAME = "cifar-100-python.tar.gz"
MEMBER_ROOT = "cifar-100-python"
IMAGE_SIDE = 32
HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
# paddle.dataset.common.download() stores a file under DATA_HOME/<module name>/<URL basename>.
PADDLE_CACHE_MODULE = "cifar"


def default_archive_path():
    return Path(paddle.dataset.common.DATA_HOME) / PADDLE_CACHE_MODULE / ARCHIVE_NAME


def resolve_archive(data_file, download):
    """The path of a readable archive, downloading it into Paddle's cache if allowed and needed.

    data_file=None means Paddle's cache location; with download=True Paddle checks the MD5 of the
    cached file and (re-)downloads it when it is missing or different.
    """
    if data_file is not None:
        path = Path(data_file).expanduser()
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise UserError(
                f"data.data_file {path} {what}. Point data.data_file at the CIFAR-100 archive "
                f"{ARCHIVE_NAME} (from {HOMEPAGE}), or set data.data_file: null and "
                f"data.download: true to let Paddle download it into {default_archive_path()}."
            )
        return path
    cached = default_archive_path()
    if not download:
        if cached.is_file():
            return cached
        raise UserError(
            f"CIFAR-100 archive not found at {cached} (Paddle's cache, used because data.data_file "
            f"is null) and data.download is false. Set data.download: true, or download "
            f"{ARCHIVE_NAME} from {HOMEPAGE} and put it there or point data.data_file at it."
        )
    try:
        return Path(paddle.dataset.common.download(CIFAR100_URL, PADDLE_CACHE_MODULE, CIFAR100_MD5))
    except Exception as error:  # Paddle retries internally and then raises whatever it last hit
        raise UserError(
            f"Could not download CIFAR-100 from {CIFAR100_URL} into {cached} "
            f"({_describe(error)}). Check the network, or download {ARCHIVE_NAME} "
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


def _unpickle_member(path, archive, member):
    """Member `member` of the open tar `archive`, unpickled with only the allowed names; None if absent."""
    try:
        handle = archive.extractfile(member)
    except KeyError:
        return None
    try:
        return _RestrictedUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as refused:
        raise UserError(
            f"{path} member {member} asks to run {refused} while it is read, which the CIFAR-100 "
            f"archive never does: the file was crafted or is not the official "
            f"{ARCHIVE_NAME}, and it was not read any further. Download the archive again from "
            f"{HOMEPAGE} (MD5 {CIFAR100_MD5}) or set data.data_file: null and data.download: true."
        ) from None


def read_split(path, split):
    """uint8 N x 3 x 32 x 32 images and int64 labels of member `split` ("train" or "test")."""
    member = f"{MEMBER_ROOT}/{split}"
    try:
        with tarfile.open(path, mode="r") as archive:
            batch = _unpickle_member(path, archive, member)
        if batch is None:
            images = labels = None
        else:
            labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
            images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE)
    except UserError:
        raise
    except Exception as error:
        # Unpickling arbitrary bytes can raise nearly any exception type; everything inside this
        # block is reading the user's file, so any failure here is a problem with that file.
        raise UserError(
            f"Could not read {path} as the CIFAR-100 archive {ARCHIVE_NAME} "
            f"({_describe(error)}). The file is truncated, corrupt or in another "
            f"format; download it again (MD5 {CIFAR100_MD5}) from {HOMEPAGE}, or set "
            f"data.data_file: null and data.download: true."
        ) from error
    if images is None:
        raise UserError(
            f"{path} has no member {member}: it is not the CIFAR-100 python archive "
            f"{ARCHIVE_NAME} (which holds {MEMBER_ROOT}/train, {MEMBER_ROOT}/test and "
            f"{MEMBER_ROOT}/meta). Download it from {HOMEPAGE} or fix data.data_file."
        )
    if len(images) != len(labels):
        raise UserError(
            f"{path} member {member} holds {len(images)} images but {len(labels)} labels: the "
            f"file is corrupt. Download it again (MD5 {CIFAR100_MD5}) from {HOMEPAGE}."
        )
    return images, labels


def read_class_names(path, num_classes):
    """Fine label names from `meta`, or "class_<i>" when meta is missing or unreadable."""
    member = f"{MEMBER_ROOT}/meta"
    try:
        with tarfile.open(path, mode="r") as archive:
            meta = _unpickle_member(path, archive, member)
        names = tuple(name.decode() for name in meta[b"fine_label_names"])
    except UserError:
        raise  # a meta that tries to run code condemns the whole file, not just the names
    except Exception as error:  # a missing meta only costs readable names in reports
        logger.warning("%s: no usable %s (%s); naming classes class_<i>", path, member, _describe(error))
        return tuple(f"class_{i}" for i in range(num_classes))
    return names


def _describe(error):
    """The exception as one line: messages must stay one paragraph, and tarfile's are multi-line."""
    return " ".join(f"{type(error).__name__}: {error}".split())
