"""CIFAR-100 from the official `cifar-100-python.tar.gz`, read with Paddle's own reader.

`paddle.vision.datasets.Cifar100` does the reading (measured: no faster hand-written reader, both
are bound by gunzip); this module locates or downloads the archive, turns every way Paddle's reader
can fail on a bad file into a `UserError` naming the file, and reads the class names from `meta`,
which Paddle ignores.
"""

import functools
import logging
import pickle
import tarfile
from pathlib import Path

from rdrop.errors import UserError

import numpy as np
import paddle.dataset.common
from paddle.vision.datasets import Cifar100
from paddle.vision.datasets.cifar import CIFAR100_MD5, CIFAR100_URL

from data.image_set import ImageSet

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


def load_cifar100(path, split, num_classes):
    """The `split` ("train" or "test") of the archive at `path` as an ImageSet (cached per file).

    num_classes only sizes the fallback class names used when the archive has no `meta`.
    """
    path = Path(path).resolve()
    stat = path.stat()
    return _load_cached(path, stat.st_mtime_ns, stat.st_size, split, num_classes)


@functools.lru_cache(maxsize=4)
def _load_cached(path, mtime_ns, size, split, num_classes):
    """mtime_ns and size are part of the cache key so a replaced file is read again."""
    images, labels = _read_split(path, split)
    # The cached arrays are shared by every caller (train, val, test views): make them read-only.
    images.flags.writeable = False
    labels.flags.writeable = False
    return ImageSet(images, labels, read_class_names(path, num_classes), str(path))


def _read_split(path, split):
    member = f"{MEMBER_ROOT}/{split}"
    try:
        reader = Cifar100(data_file=str(path), mode=split, download=False, backend="cv2")
        # Paddle's reader keeps the raw rows as `data`: (3072-byte channel-major row, label) pairs.
        rows = [row for row, _ in reader.data]
        labels = np.asarray([label for _, label in reader.data], dtype=np.int64)
        images = np.stack(rows).astype(np.uint8).reshape(-1, 3, IMAGE_SIDE, IMAGE_SIDE) if rows else None
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
    return images, labels


def read_class_names(path, num_classes):
    """Fine label names from `meta`, or "class_<i>" when meta is missing or unreadable."""
    member = f"{MEMBER_ROOT}/meta"
    try:
        with tarfile.open(path, mode="r") as archive:
            meta = pickle.load(archive.extractfile(member), encoding="bytes")
        names = tuple(name.decode() for name in meta[b"fine_label_names"])
    except Exception as error:  # a missing meta only costs readable names in reports
        logger.warning("%s: no usable %s (%s); naming classes class_<i>", path, member, _describe(error))
        return tuple(f"class_{i}" for i in range(num_classes))
    return names


def _describe(error):
    """The exception as one line: messages must stay one paragraph, and tarfile's are multi-line."""
    return " ".join(f"{type(error).__name__}: {error}".split())
