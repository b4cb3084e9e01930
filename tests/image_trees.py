"""Write small image datasets in the `folder` and `filelist` layouts for tests: every image a
different size, mode and format, with the pixels it was written from kept for the checks.

`IMAGE_KINDS` are (mode, format) pairs Pillow writes losslessly but for JPEG; `expected_rgb` is the
RGB image the data package must read from such a file, computed from the written pixels with the
conversion rules stated in data/file_images.py (grey replicated, alpha dropped, palette looked up,
16-bit scaled to 8, CMYK as (255 - C) * (255 - K) / 255).
"""

import os

import numpy as np
from PIL import Image

# (mode, Pillow format, extension); JPEG last so lossless kinds come first in small sets.
IMAGE_KINDS = (
    ("RGB", "PNG", ".png"),
    ("L", "PNG", ".PNG"),
    ("LA", "PNG", ".png"),
    ("P", "BMP", ".bmp"),
    ("RGBA", "PNG", ".png"),
    ("CMYK", "TIFF", ".tiff"),
    ("I;16", "PNG", ".png"),
    ("RGB", "PPM", ".ppm"),
    ("L", "WEBP", ".webp"),
    ("RGB", "JPEG", ".JPEG"),
    ("L", "JPEG", ".jpg"),
    ("CMYK", "JPEG", ".jpeg"),
)
LOSSY_FORMATS = ("JPEG", "WEBP")


def image_pixels(rng, mode, height, width):
    """The array Pillow's `Image.fromarray`/`putdata` builds a `mode` image from."""
    if mode == "I;16":
        return rng.integers(0, 65536, size=(height, width), dtype=np.uint16)
    bands = {"RGB": 3, "L": 1, "LA": 2, "P": 1, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, size=(height, width, bands), dtype=np.uint8)
    return pixels[:, :, 0] if bands == 1 else pixels


def palette(rng):
    return rng.integers(0, 256, size=(256, 3), dtype=np.uint8)


def write_image(path, rng, mode, image_format, height, width):
    """Write one image and return the RGB uint8 H x W x 3 array it should read back as (for
    lossless formats; lossy ones are approximately that)."""
    pixels = image_pixels(rng, mode, height, width)
    if mode == "P":
        colours = palette(rng)
        image = Image.fromarray(pixels, mode="L").convert("P")
        image.putpalette(colours.ravel().tolist())
        expected = colours[pixels]
    elif mode == "I;16":
        image = Image.fromarray(pixels)
        grey = np.rint(pixels.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
        expected = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        image = Image.fromarray(pixels, mode=mode)
        if mode == "L":
            expected = np.repeat(pixels[:, :, None], 3, axis=2)
        elif mode == "LA":
            expected = np.repeat(pixels[:, :, :1], 3, axis=2)
        elif mode == "CMYK":
            ink = pixels.astype(np.int64)
            expected = np.rint((255 - ink[:, :, :3]) * (255 - ink[:, :, 3:]) / 255.0).astype(np.uint8)
        else:
            expected = pixels[:, :, :3]
    options = {"quality": 95} if image_format in LOSSY_FORMATS else {}
    if image_format == "WEBP":
        options["lossless"] = False
    image.save(path, format=image_format, **options)
    return expected


def write_folder_tree(root, class_counts, seed=0, kinds=IMAGE_KINDS):
    """root/<class>/<i><ext> for {class: count}; returns {relative path: expected RGB array}.

    Sizes vary from 5 to 40 pixels per side; kinds cycle over `kinds` across the whole tree.
    """
    rng = np.random.default_rng(seed)
    written, serial = {}, 0
    for name, count in class_counts.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            mode, image_format, extension = kinds[serial % len(kinds)]
            serial += 1
            relative = f"{name}/{i:03d}{extension}"
            height, width = (int(side) for side in rng.integers(5, 41, size=2))
            written[relative] = write_image(os.path.join(root, relative), rng, mode, image_format, height, width)
    return written


def write_file_list(path, entries):
    """One `relative/path label` line per (path, label)."""
    with open(path, "w", encoding="utf-8") as stream:
        stream.writelines(f"{relative} {label}\n" for relative, label in entries)
    return path


# Lossless (mode, format, extension) kinds that keep a constant colour exactly.
COLOUR_KINDS = (
    ("RGB", "PNG", ".png"),
    ("RGBA", "PNG", ".png"),
    ("P", "BMP", ".bmp"),
    ("RGB", "TIFF", ".tif"),
    ("RGB", "PPM", ".ppm"),
    ("RGB", "BMP", ".BMP"),
)


def colour_of(serial):
    """A distinct RGB colour per image serial number (up to 4096 images)."""
    return (16 * (serial % 16) + 8, 16 * (serial // 16 % 16) + 8, 16 * (serial // 256) + 8)


def write_coloured_image(path, serial, height, width, kind):
    """An image of one flat colour, `colour_of(serial)`: any crop or resize of it keeps that colour,
    so a batch tells which images it holds."""
    mode, image_format, _ = kind
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[:] = colour_of(serial)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        image.putalpha(128)
    elif mode == "P":
        image = image.quantize(colors=2)
    image.save(path, format=image_format)


def write_coloured_tree(root, class_counts, first_serial=0, seed=0):
    """root/<class>/<i><ext> of flat-coloured images of varied size and kind; returns
    {relative path: serial} (serials counted from first_serial in writing order)."""
    rng = np.random.default_rng(seed)
    serials = {}
    for name, count in class_counts.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            serial = first_serial + len(serials)
            kind = COLOUR_KINDS[serial % len(COLOUR_KINDS)]
            relative = f"{name}/{i:03d}{kind[2]}"
            height, width = (int(side) for side in rng.integers(5, 41, size=2))
            write_coloured_image(os.path.join(root, relative), serial, height, width, kind)
            serials[relative] = serial
    return serials


def serials_in(images):
    """The serial of each flat-coloured image in a batch of model-ready images (normalised to [-1, 1])."""
    pixels = np.rint((np.asarray(images, dtype=np.float64).mean(axis=(2, 3)) + 1.0) * 127.5).astype(np.int64)
    lookup = {colour_of(serial): serial for serial in range(4096)}
    return [lookup[tuple(int(value) for value in colour)] for colour in pixels]
