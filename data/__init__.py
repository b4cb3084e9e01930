"""Input pipeline: CIFAR-100 and the offline digits dataset, sharded resumable sampling, and a
host or device-side augmentation path (`data.device_augment`) behind the same loaders.

    stream = data.TrainStream(cfg, rank, world_size)          # endless training micro-batches
    images, labels = next(stream); logits = model(images)
    stream.state_dict() / stream.set_state_dict(state)        # resume where a run stopped
    stream.close()                                            # stop its workers (also on garbage collection)

    loader = data.build_eval_loader(cfg, "test", rank, world_size)   # or "val"; shards without padding
    for images, labels in loader: ...

    data.prepare_dataset(cfg)   # download/locate the archive (call on one rank before the others)
    data.class_names(cfg)       # names for reports

Either way `images` is float32 N x 3 x img_size x img_size, normalised, and `labels` int64 N.
"""

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
    "InputSettings",
    "TrainStream",
    "build_eval_loader",
    "class_names",
    "prepare_dataset",
]
