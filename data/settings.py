"""The input-pipeline view of the validated config.

The config system (rdrop/config.py) has already validated every value. Modules below take an
`InputSettings`, not the raw dict, so the config keys the input pipeline depends on are listed in one
place.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSettings:
    dataset: str
    data_file: str | None
    download: bool
    crop_scale: tuple
    num_workers: int
    val_size: int
    device_augment: bool
    img_size: int
    num_classes: int
    seed: int
    micro_batch_size: int
    eval_batch_size: int

    @classmethod
    def from_config(cls, cfg):
        data = cfg["data"]
        settings = cls(
            dataset=data["dataset"],
            data_file=data["data_file"],
            download=bool(data["download"]),
            crop_scale=tuple(float(value) for value in data["crop_scale"]),
            num_workers=int(data["num_workers"]),
            val_size=int(data["val_size"]),
            device_augment=bool(data["device_augment"]),
            img_size=int(cfg["model"]["img_size"]),
            num_classes=int(cfg["model"]["num_classes"]),
            seed=int(cfg["train"]["seed"]),
            micro_batch_size=int(cfg["train"]["micro_batch_size"]),
            eval_batch_size=int(cfg["eval"]["batch_size"]),
        )
        return settings
