"""File datasets: the class-per-folder index, PaddleClas lists, the start-of-run file check and the
per-image path (decode -> RGB -> crop/resize -> normalised CHW)."""

import os

from rdrop.errors import UserError

import numpy as np
import paddle.vision.transforms.functional as paddle_functional
import pytest
from image_trees import IMAGE_KINDS, LOSSY_FORMATS, write_file_list, write_folder_tree, write_image
from PIL import Image

from data import image_files, transforms
from data.transforms import sample_crop_box


def assert_user_error(call, *fragments):
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


@pytest.fixture
def tree(tmp_path):
    """train/ with three classes (one holding a nested folder and files to skip), test/ with two.
    Image kinds cycle in the order the classes are written: zebra png, PNG, png; ant bmp, png; Moth tiff, png."""
    train, test = tmp_path / "train", tmp_path / "test"
    write_folder_tree(train, {"zebra": 3, "ant": 2, "Moth": 2}, seed=1)
    write_folder_tree(test, {"zebra": 2, "ant": 1}, seed=2)
    os.makedirs(train / "ant" / "more")
    write_image(train / "ant" / "more" / "deep.png", np.random.default_rng(3), "RGB", "PNG", 6, 7)
    (train / "ant" / "notes.txt").write_text("not an image")
    (train / "ant" / ".hidden.png").write_bytes(b"")
    os.makedirs(train / ".cache")
    return train, test


def listed(file_set):
    return [(file_set.relative_path(i), int(file_set.labels[i])) for i in range(len(file_set))]


def test_folder_classes_are_sorted_subfolder_names_with_one_mapping(tree):
    train, test = tree
    sets = image_files.index_folders(str(train), str(test), num_classes=3)
    assert sets["train"].class_names == sets["test"].class_names == ("Moth", "ant", "zebra")
    assert listed(sets["train"]) == [
        ("Moth/000.tiff", 0),
        ("Moth/001.png", 0),
        ("ant/000.bmp", 1),
        ("ant/001.png", 1),
        ("ant/more/deep.png", 1),
        ("zebra/000.png", 2),
        ("zebra/001.PNG", 2),
        ("zebra/002.png", 2),
    ]
    assert listed(sets["test"]) == [("ant/000.png", 1), ("zebra/000.png", 2), ("zebra/001.PNG", 2)]
    assert sets["train"].path(0) == os.path.join(str(train), "Moth/000.tiff")


def test_index_is_the_same_whatever_order_files_were_created_in(tmp_path):
    names = ["b.png", "a.jpg", "c.JPEG", "a0.png"]
    indexes = []
    for attempt, order in enumerate((names, names[::-1])):
        root = tmp_path / str(attempt)
        for split in ("train", "test"):
            os.makedirs(root / split / "only")
            for name in order:
                (root / split / "only" / name).write_bytes(b"x")
        sets = image_files.index_folders(str(root / "train"), str(root / "test"), num_classes=1)
        indexes.append(listed(sets["train"]))
    assert indexes[0] == indexes[1] == [(f"only/{name}", 0) for name in sorted(names)]


def test_every_accepted_extension_in_any_case_is_indexed(tmp_path):
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / "c")
        for extension in image_files.IMAGE_EXTENSIONS + (".gif", ".txt"):
            for name in (f"x{extension}", f"y{extension.upper()}"):
                (tmp_path / split / "c" / name).write_bytes(b"x")
    sets = image_files.index_folders(str(tmp_path / "train"), str(tmp_path / "test"), num_classes=1)
    suffixes = {os.path.splitext(path)[1].lower() for path, _ in listed(sets["train"])}
    assert suffixes == {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
    assert len(sets["train"]) == 18


def test_a_test_class_unknown_to_training_is_an_error(tree):
    train, test = tree
    write_folder_tree(test, {"spider": 1})
    assert_user_error(lambda: image_files.index_folders(str(train), str(test), 3), "spider", "data.test_dir")


def test_an_empty_class_folder_is_an_error(tree):
    train, test = tree
    os.makedirs(train / "empty" / "sub")
    (train / "empty" / "readme.txt").write_text("no images")
    assert_user_error(lambda: image_files.index_folders(str(train), str(test), 4), train / "empty", "no image files")


@pytest.mark.parametrize("num_classes", [2, 4])
def test_num_classes_must_match_the_class_folders(tree, num_classes):
    train, test = tree
    assert_user_error(
        lambda: image_files.index_folders(str(train), str(test), num_classes), "3 class folders", "model.num_classes: 3"
    )


def test_missing_or_flat_training_folder(tmp_path):
    assert_user_error(lambda: image_files.index_folders(str(tmp_path / "no"), str(tmp_path), 2), tmp_path / "no")
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert_user_error(lambda: image_files.index_folders(str(tmp_path), str(tmp_path), 2), "no sub-folders")


def test_a_symlink_loop_between_folders_is_an_error(tree):
    train, test = tree
    os.symlink("..", train / "zebra" / "up")
    assert_user_error(
        lambda: image_files.index_folders(str(train), str(test), 3), train / "zebra" / "up", "symlink loop"
    )


def test_a_symlinked_class_folder_and_file_are_followed(tree, tmp_path):
    train, test = tree
    write_folder_tree(tmp_path / "elsewhere", {"wasp": 1})
    os.symlink(tmp_path / "elsewhere" / "wasp", train / "wasp")
    os.symlink(train / "ant" / "001.png", train / "zebra" / "linked.png")
    sets = image_files.index_folders(str(train), str(test), num_classes=4)
    assert sets["train"].class_names == ("Moth", "ant", "wasp", "zebra")
    assert ("wasp/000.png", 2) in listed(sets["train"])
    assert ("zebra/linked.png", 3) in listed(sets["train"])
    image_files.check_files(sets["train"], processes=1)


def test_file_lists_as_paddleclas_writes_them(tmp_path):
    write_folder_tree(tmp_path / "images", {"a": 2, "b b": 1})
    train_list = write_file_list(tmp_path / "train.txt", [("images/a/000.png", 1), ("images/b b/000.png", 0)])
    test_list = tmp_path / "val.txt"
    test_list.write_text("\nimages/a/001.PNG\t1\n\n")
    names = tmp_path / "labels.txt"
    names.write_text("0 tench, Tinca tinca\n1 goldfish\n")
    sets = image_files.read_file_lists(str(tmp_path), str(train_list), str(test_list), str(names), 2)
    assert listed(sets["train"]) == [("images/a/000.png", 1), ("images/b b/000.png", 0)]
    assert listed(sets["test"]) == [("images/a/001.PNG", 1)]
    assert sets["test"].class_names == ("tench, Tinca tinca", "goldfish")
    assert sets["test"].describe(0) == f"{test_list} line 2 ({tmp_path / 'images/a/001.PNG'})"
    without_names = image_files.read_file_lists(str(tmp_path), str(train_list), str(test_list), None, 2)
    assert without_names["train"].class_names == ("0", "1")


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("x.png 5", "label 5, not below model.num_classes (3)"),
        ("x.png", "is not `relative/path label`"),
        ("x.png -1", "is not `relative/path label`"),
        ("x.png 0,1", "is not `relative/path label`"),
    ],
)
def test_a_bad_list_line_is_named(tmp_path, line, fragment):
    good = write_file_list(tmp_path / "good.txt", [("x.png", 0), ("y.png", 2)])
    bad = tmp_path / "bad.txt"
    bad.write_text(f"x.png 0\n{line}\n")
    for train, test in ((bad, good), (good, bad)):
        assert_user_error(
            lambda train=train, test=test: image_files.read_file_lists(str(tmp_path), str(train), str(test), None, 3),
            bad,
            "line 2",
            fragment,
        )


def test_list_classes_must_match_num_classes(tmp_path):
    listing = write_file_list(tmp_path / "l.txt", [("x.png", 0), ("y.png", 1)])
    assert_user_error(
        lambda: image_files.read_file_lists(str(tmp_path), str(listing), str(listing), None, 3), "2 classes"
    )
    names = tmp_path / "names.txt"
    names.write_text("0 a\n1 b\n")
    assert_user_error(
        lambda: image_files.read_file_lists(str(tmp_path), str(listing), str(listing), str(names), 3),
        names,
        "2 classes",
    )
    names.write_text("0 a\n2 b\n1 c\n")
    sets = image_files.read_file_lists(str(tmp_path), str(listing), str(listing), str(names), 3)
    assert sets["train"].class_names == ("a", "c", "b")


@pytest.mark.parametrize(
    "content, fragment", [("0 a\n0 b\n", "line 2"), ("0 a\nb\n", "line 2"), ("0 a\n2 c\n", "class id(s) 1")]
)
def test_a_bad_class_names_file_is_named(tmp_path, content, fragment):
    names = tmp_path / "names.txt"
    names.write_text(content)
    listing = write_file_list(tmp_path / "l.txt", [("x.png", 0)])
    assert_user_error(
        lambda: image_files.read_file_lists(str(tmp_path), str(listing), str(listing), str(names), 2), names, fragment
    )


def test_valid_images_of_every_kind_pass_the_check(tmp_path):
    write_folder_tree(tmp_path / "train", {"a": len(IMAGE_KINDS)})
    write_folder_tree(tmp_path / "test", {"a": 1})
    file_set = image_files.index_folders(str(tmp_path / "train"), str(tmp_path / "test"), 1)["train"]
    for processes in (1, 2):
        image_files.check_files(file_set, processes)


def _jpeg_bytes(tmp_path):
    write_image(tmp_path / "full.jpg", np.random.default_rng(0), "RGB", "JPEG", 64, 48)
    return (tmp_path / "full.jpg").read_bytes()


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("cut.jpg", lambda full: full[: len(full) // 2], "is not a readable image"),
        ("cut.png", None, "is not a readable image"),
        ("cut.bmp", None, "is not a readable image"),
        ("text.jpg", lambda full: b"hello, not a picture", "is not a readable image"),
        ("empty.png", lambda full: b"", "is empty"),
    ],
)
def test_broken_files_are_named_before_training(tmp_path, name, content, fragment):
    full = _jpeg_bytes(tmp_path)
    images = tmp_path / "images"
    write_folder_tree(images, {"a": 3})
    if content is None:  # a lossless format cut short
        kind = {"png": ("RGB", "PNG"), "bmp": ("RGB", "BMP")}[name.rsplit(".", 1)[1]]
        write_image(tmp_path / "whole", np.random.default_rng(0), *kind, 40, 40)
        whole = (tmp_path / "whole").read_bytes()
        (images / "a" / name).write_bytes(whole[: len(whole) * 2 // 3])
    else:
        (images / "a" / name).write_bytes(content(full))
    listing = write_file_list(tmp_path / "l.txt", [("a/000.png", 0), (f"a/{name}", 0), ("a/001.PNG", 0)])
    file_set = image_files.read_file_lists(str(images), str(listing), str(listing), None, 1)["train"]
    for processes in (1, 2):
        assert_user_error(
            lambda processes=processes: image_files.check_files(file_set, processes),
            "1 of the 3",
            f"{listing} line 2",
            fragment,
        )


def test_missing_listed_files_and_symlink_loops_are_named(tmp_path):
    write_folder_tree(tmp_path, {"a": 1})
    os.symlink("loop.png", tmp_path / "a" / "loop.png")
    listing = write_file_list(tmp_path / "l.txt", [("a/000.png", 0), ("a/gone.png", 0), ("a/loop.png", 0)])
    file_set = image_files.read_file_lists(str(tmp_path), str(listing), str(listing), None, 1)["train"]
    message = assert_user_error(lambda: image_files.check_files(file_set, 1), "2 of the 3", "line 2", "does not exist")
    assert "line 3" in message and "symlink loop" in message


def test_a_jpeg_with_trailing_bytes_is_decoded_and_accepted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(_jpeg_bytes(tmp_path) + b"\0" * 500)
    listing = write_file_list(tmp_path / "l.txt", [("a/x.jpg", 0)])
    image_files.check_files(image_files.read_file_lists(str(tmp_path), str(listing), str(listing), None, 1)["train"], 1)


@pytest.mark.parametrize("mode, image_format, extension", IMAGE_KINDS)
def test_every_mode_and_format_reads_as_the_expected_rgb(tmp_path, mode, image_format, extension):
    path = tmp_path / f"x{extension}"
    expected = write_image(path, np.random.default_rng(5), mode, image_format, 23, 31)
    rgb = transforms.load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (31, 23)
    pixels = np.asarray(rgb).astype(np.int64)
    if image_format in LOSSY_FORMATS:
        assert abs(pixels.mean() - expected.mean()) < 8
    else:
        np.testing.assert_array_equal(pixels, expected)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif)
    assert transforms.load_rgb(tmp_path / "r.jpg").size == (10, 30)


def test_eval_pixels_are_the_public_codes_resize_then_normalise(tmp_path):
    expected = write_image(tmp_path / "x.png", np.random.default_rng(6), "L", "PNG", 37, 19)
    resized = paddle_functional.resize(Image.fromarray(expected), (24, 24), "bilinear")
    reference = (np.asarray(resized, dtype=np.float32) / 255.0 - 0.5) / 0.5
    out = transforms.file_eval_pixels(tmp_path / "x.png", 24)
    assert out.dtype == np.float32 and out.shape == (3, 24, 24)
    np.testing.assert_allclose(out, reference.transpose(2, 0, 1), atol=1e-6)


def test_train_pixels_are_the_recipes_random_resized_crop(tmp_path):
    expected = write_image(tmp_path / "x.bmp", np.random.default_rng(7), "RGB", "BMP", 50, 70)
    out = transforms.file_train_pixels(tmp_path / "x.bmp", np.random.default_rng(11), 16, (0.2, 0.6))
    box = sample_crop_box(np.random.default_rng(11), 50, 70, (0.2, 0.6))
    crop = paddle_functional.crop(Image.fromarray(expected), box.top, box.left, box.height, box.width)
    reference = (np.asarray(paddle_functional.resize(crop, (16, 16), "bilinear"), dtype=np.float32) / 255.0 - 0.5) / 0.5
    assert 0.2 * 50 * 70 * 0.9 <= box.height * box.width <= 0.6 * 50 * 70 * 1.1
    np.testing.assert_allclose(out, reference.transpose(2, 0, 1), atol=1e-6)
