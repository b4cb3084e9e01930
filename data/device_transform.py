"""The device-side input path (`data.device_augment: true`): crop, resize and normalise a batch.

The host only gathers uint8 32x32 images (3 KB each) plus, for training, the crop boxes it drew
with `data.transforms.sample_crop_box` from the same per-sample generator as the host path. Here
each box becomes an affine sampling grid (`affine_grid`) and the whole batch is resampled at once
with bilinear `grid_sample` on whatever device the batch lives on. With `align_corners=False` and
border padding this is the geometry of `data.transforms.resized_crop` (see that module), so for
the same boxes both paths produce the same float32 NCHW images up to rounding.
"""

import paddle
import paddle.nn.functional as F

from data.transforms import MEAN, STD


def normalize(pixels):
    """uint8 tensor -> float32 in [-1, 1] (the same mapping as data.transforms.normalize)."""
    return (pixels.astype("float32") / 255.0 - MEAN) / STD


def resized_crop_batch(pixels, boxes, out_size):
    """uint8 N x C x H x W pixels and N x 4 boxes -> float32 N x C x out_size x out_size."""
    batch, channels, height, width = pixels.shape
    boxes = boxes.astype("float32")
    top, left, crop_height, crop_width = paddle.unbind(boxes, axis=1)
    # affine_grid maps output coordinates u in [-1, 1] to input coordinates scale * u + shift,
    # both normalised so that -1 and 1 are the outer edges of the image (align_corners=False).
    scale_x = crop_width / width
    shift_x = (2.0 * left + crop_width) / width - 1.0
    scale_y = crop_height / height
    shift_y = (2.0 * top + crop_height) / height - 1.0
    zeros = paddle.zeros_like(scale_x)
    theta = paddle.stack(
        [
            paddle.stack([scale_x, zeros, shift_x], axis=1),
            paddle.stack([zeros, scale_y, shift_y], axis=1),
        ],
        axis=1,
    )
    grid = F.affine_grid(theta, [batch, channels, out_size, out_size], align_corners=False)
    return F.grid_sample(normalize(pixels), grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_batch(pixels, out_size):
    """The eval transform: whole images resized to out_size x out_size and normalised."""
    batch, _, height, width = pixels.shape
    whole = paddle.to_tensor([[0.0, 0.0, height, width]], dtype="float32", place=pixels.place)
    return resized_crop_batch(pixels, whole.expand([batch, 4]), out_size)
