"""The host's share of the input path: map-style datasets that turn a sample key into what one image
contributes to a batch (run in the loader's workers).

Training keys are (epoch, index) pairs from `data.sharding.TrainBatchSampler`; the crop of a sample
is drawn from a generator derived from (train.seed, epoch, index) alone, so augmentation does not
depend on which worker process reads the sample or on what was read before (no worker seeding
needed, and a resumed stream gets the same crops). Evaluation keys are plain indices.

    host path,   train: (float32 3 x S x S normalised, int64 label)
    host path,   eval:  (float32 3 x S x S normalised, int64 label)
    device path, train: (uint8 3 x 32 x 32, float32 [top, left, height, width], int64 label)
    device path, eval:  (uint8 3 x 32 x 32, int64 label)
"""

import numpy as np
import paddle

from data.seeding import Purpose, derived_rng
from data.transforms import resized_crop, sample_crop_box, whole_image_box


class TrainSamples(paddle.io.Dataset):
    def __init__(self, image_set, settings):
        super().__init__()
        self.image_set = image_set
        self._seed = settings.seed
        self._scale = settings.crop_scale
        self._size = settings.img_size
        self._device_augment = settings.device_augment

    def __len__(self):
        return len(self.image_set)

    def __getitem__(self, key):
        epoch, index = key
        image = self.image_set.images[index]
        label = self.image_set.labels[index]
        rng = derived_rng(self._seed, Purpose.AUGMENTATION, epoch, index)
        box = sample_crop_box(rng, image.shape[1], image.shape[2], self._scale)
        if self._device_augment:
            return image, np.asarray(box, dtype=np.float32), label
        return resized_crop(image, box, self._size), label


class EvalSamples(paddle.io.Dataset):
    def __init__(self, image_set, settings):
        super().__init__()
        self.image_set = image_set
        self._size = settings.img_size
        self._device_augment = settings.device_augment

    def __len__(self):
        return len(self.image_set)

    def __getitem__(self, index):
        image = self.image_set.images[index]
        label = self.image_set.labels[index]
        if self._device_augment:
            return image, label
        return resized_crop(image, whole_image_box(image.shape[1], image.shape[2]), self._size), label
