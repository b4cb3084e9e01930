"""Input pipeline: CIFAR-100 and the offline digits dataset, sharded resumable sampling, and a
host or device-side augmentation path.

    stream = data.TrainStream(cfg, rank, world_size)          # endless (images, labels) micro-batches
    to_model = data.build_batch_transform(cfg, train=True)    # identity on the host path
    images, labels = next(stream); logits = model(to_model(images))
    stream.state_dict() / stream.set_state_dict(state)        # exact resume
    stream.close()                                            # stop its workers (also on garbage collection)

    loader = data.build_eval_loader(cfg, "test", rank, world_size)   # or "val"; exact shards
    to_model = data.build_batch_transform(cfg, train=False)
    for images, labels in loader: ...

    data.prepare_dataset(cfg)   # download/locate the archive (call on one rank before the others)
    data.class_names(cfg)       # names for reports

On the device path (data.device_augment) `images` is a `CropBatch` (training) or uint8 NCHW (eval)
until the batch transform turns it into float32 NCHW; count images with `labels`.
"""

from data.device_transform import CropBatch, build_batch_transform
from data.loader import TrainStream, build_eval_loader, class_names
from data.settings import InputSettings
from data.splits import dataset_file


def prepare_dataset(cfg):
    """Locate the dataset file, downloading it if the config allows; None for digits.

    Call it on one rank (e.g. local rank 0) and barrier before building loaders, so that several
    processes do not download into the same cache file at once.
    """
    return dataset_file(InputSettings.from_config(cfg))


__all__ = [
    "CropBatch",
    "InputSettings",
    "TrainStream",
    "build_batch_transform",
    "build_eval_loader",
    "class_names",
    "prepare_dataset",
]
