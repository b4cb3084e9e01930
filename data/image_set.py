"""The in-memory form every dataset is reduced to: uint8 images, int64 labels and class names.

CIFAR-100 and the digits dataset differ only in how they produce an `ImageSet`; sampling,
transforms and loaders work on this type alone.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, N x 3 x H x W (channel-major, like the CIFAR rows)
    labels: np.ndarray  # int64, N
    class_names: tuple
    source: str  # where the images came from (a file path or a package), for messages

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return ImageSet(self.images[indices], self.labels[indices], self.class_names, self.source)
