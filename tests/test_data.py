"""The data package end to end on tiny CIFAR-100 archives and on digits: what the loaders yield,
sharding, epoch order, exact resume, the validation split."""

import itertools
import multiprocessing

from rdrop.step import accumulation_steps

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from cifar_archive import cifar100_arrays, fine_label_names, write_cifar100_archive
from data_helpers import IDENTIFIABLE, index_lookup, indices_of, make_cfg

import data
from data.datasets import ImageSet, load_split, validation_indices
from data.loader import TrainSamples

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def odd_archive(tmp_path_factory):
    """30 training and 11 test images: sizes that divide by neither 2 nor 3 nor 4."""
    path = tmp_path_factory.mktemp("cifar") / "cifar-100-python.tar.gz"
    return write_cifar100_archive(path, num_train=30, num_test=11, seed=7, num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def arrays():
    return cifar100_arrays(30, 11, seed=7, num_classes=NUM_CLASSES)


def take(stream, count):
    return list(itertools.islice(stream, count))


def normalised(images):
    return images.astype(np.float32) / 127.5 - 1.0


# --- what comes out -------------------------------------------------------------------------------


def test_host_training_batches_are_normalised_float_nchw(odd_archive):
    cfg = make_cfg(odd_archive, img_size=40, micro_batch_size=5)
    images, labels = next(data.TrainStream(cfg, rank=0, world_size=1))
    assert images.shape == [5, 3, 40, 40] and images.dtype == paddle.float32
    assert labels.shape == [5] and labels.dtype == paddle.int64
    values = images.numpy()
    assert values.min() >= -1.0 and values.max() <= 1.0
    # Random uint8 images use most of the range; a [0, 1] or [0, 255] output would fail this.
    assert values.min() < -0.9 and values.max() > 0.9


def test_device_path_hands_out_the_same_kind_of_batches(odd_archive):
    """With data.device_augment the loaders finish the batches themselves: the model gets float32
    NCHW images at img_size, normalised, as on the host path."""
    cfg = make_cfg(odd_archive, img_size=40, micro_batch_size=5, eval_batch_size=4, device_augment=True)
    for images, labels in (next(data.TrainStream(cfg, 0, 1)), next(iter(data.build_eval_loader(cfg, "test", 0, 1)))):
        assert images.shape == [labels.shape[0], 3, 40, 40] and images.dtype == paddle.float32
        assert labels.dtype == paddle.int64
        values = images.numpy()
        assert values.min() >= -1.0 - 1e-6 and values.max() <= 1.0 + 1e-6
        assert values.min() < -0.9 and values.max() > 0.9


def test_device_path_crop_boxes_lie_inside_the_image(arrays):
    """What the host draws for the device path: the uint8 source image and a crop box within it."""
    images, labels = arrays["train"]
    settings = data.InputSettings.from_config(make_cfg(None, device_augment=True))
    samples = TrainSamples(ImageSet(images, labels, (), "arrays"), settings)
    for epoch, index in itertools.product(range(3), range(len(labels))):
        pixels, box, label = samples[(epoch, index)]
        np.testing.assert_array_equal(pixels, images[index])
        assert label == labels[index] and box.dtype == np.float32
        top, left, height, width = box
        assert top >= 0 and left >= 0 and height > 0 and width > 0 and top + height <= 32 and left + width <= 32


def test_test_image_and_label_at_a_known_index(odd_archive, arrays):
    """img_size 32 makes the eval resize the identity, so the expected tensor is just the archive's
    image (R, G, B planes in that order) normalised; a channel or axis mix-up changes it."""
    images, labels = arrays["test"]
    loader = data.build_eval_loader(make_cfg(odd_archive, eval_batch_size=4), "test", rank=0, world_size=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 11 images in batches of 4
    got_images = np.concatenate([batch[0].numpy() for batch in batches])
    got_labels = np.concatenate([batch[1].numpy() for batch in batches])
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(got_images[6], normalised(images[6]), atol=1e-6)
    np.testing.assert_allclose(got_images, normalised(images), atol=1e-6)
    assert data.class_names(make_cfg(odd_archive)) == tuple(fine_label_names(NUM_CLASSES))


def test_eval_resize_is_bilinear_resize(odd_archive, arrays):
    images, _ = arrays["test"]
    loader = data.build_eval_loader(make_cfg(odd_archive, img_size=56, eval_batch_size=11), "test", 0, 1)
    got = next(iter(loader))[0].numpy()
    expected = F.interpolate(
        paddle.to_tensor(normalised(images)), size=[56, 56], mode="bilinear", align_corners=False
    ).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_class_names_fall_back_when_meta_is_missing(tmp_path):
    path = write_cifar100_archive(tmp_path / "a.tar.gz", 8, 4, num_classes=3, omit_members=("meta",))
    names = data.class_names(make_cfg(path, num_classes=3))
    assert names == ("class_0", "class_1", "class_2")


# --- training order and sharding ------------------------------------------------------------------


def epoch_indices(cfg, rank, world_size, lookup, epochs=1):
    """Per epoch, the list of batches (lists of training-set indices) one rank receives (cfg with
    IDENTIFIABLE)."""
    stream = data.TrainStream(cfg, rank, world_size)
    batches = take(stream, stream.batches_per_epoch * epochs)
    per_batch = [indices_of(batch.numpy(), lookup) for batch, _ in batches]
    return [per_batch[i * stream.batches_per_epoch : (i + 1) * stream.batches_per_epoch] for i in range(epochs)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_training_shards_are_disjoint_equal_and_drop_only_the_tail(odd_archive, arrays, world_size):
    micro_batch = 4
    cfg = make_cfg(odd_archive, micro_batch_size=micro_batch, **IDENTIFIABLE)
    lookup = index_lookup(arrays["train"][0])
    per_rank = [epoch_indices(cfg, rank, world_size, lookup)[0] for rank in range(world_size)]
    steps = 30 // (world_size * micro_batch)
    seen = []
    for batches in per_rank:
        assert len(batches) == steps
        assert all(len(batch) == micro_batch for batch in batches)
        seen.extend(index for batch in batches for index in batch)
    assert len(seen) == len(set(seen)) == steps * world_size * micro_batch
    assert set(seen) <= set(range(30))


def test_a_global_step_covers_the_same_images_for_any_world_size(odd_archive, arrays):
    lookup = index_lookup(arrays["train"][0])
    single = epoch_indices(make_cfg(odd_archive, micro_batch_size=6, **IDENTIFIABLE), 0, 1, lookup)[0]
    cfg = make_cfg(odd_archive, micro_batch_size=2, **IDENTIFIABLE)
    per_rank = [epoch_indices(cfg, rank, 3, lookup)[0] for rank in range(3)]
    for step, batch in enumerate(single):
        assert list(itertools.chain(*(per_rank[rank][step] for rank in range(3)))) == batch


def test_every_epoch_is_a_new_order_of_the_same_images(tmp_path):
    path = write_cifar100_archive(tmp_path / "a.tar.gz", 24, 4, num_classes=NUM_CLASSES)
    lookup = index_lookup(cifar100_arrays(24, 4, num_classes=NUM_CLASSES)["train"][0])
    cfg = make_cfg(path, micro_batch_size=4, **IDENTIFIABLE)
    epochs = [list(itertools.chain(*batches)) for batches in epoch_indices(cfg, 0, 1, lookup, epochs=3)]
    for order in epochs:
        assert sorted(order) == list(range(24))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_order_depends_on_the_seed_only(odd_archive, arrays):
    lookup = index_lookup(arrays["train"][0])
    orders = {
        seed: [epoch_indices(make_cfg(odd_archive, seed=seed, **IDENTIFIABLE), 0, 1, lookup, 2) for _ in range(2)]
        for seed in (0, 1)
    }
    assert orders[0][0] == orders[0][1] and orders[1][0] == orders[1][1]
    assert orders[0][0] != orders[1][0]


# --- exact resume ---------------------------------------------------------------------------------


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        np.testing.assert_array_equal(labels_a.numpy(), labels_b.numpy())
        np.testing.assert_array_equal(images_a.numpy(), images_b.numpy())


def test_resumed_stream_continues_with_the_same_images_labels_and_crops(odd_archive):
    cfg = make_cfg(odd_archive, img_size=24, micro_batch_size=4)
    original = data.TrainStream(cfg, rank=0, world_size=1)
    consumed = 9  # 7 micro-batches per epoch (30 // 4): the resume point is inside epoch 1
    take(original, consumed)
    state = original.state_dict()
    assert (state["epoch"], state["batches_in_epoch"]) == divmod(consumed, 30 // 4)
    expected = take(original, 8)

    resumed = data.TrainStream(cfg, rank=0, world_size=1)
    resumed.set_state_dict(state)
    assert_same_batches(take(resumed, 8), expected)


def test_worker_processes_give_the_same_batches_and_resume(odd_archive):
    """Crops come from per-sample generators, so worker count and process boundaries don't matter."""
    cfg = make_cfg(odd_archive, img_size=24, micro_batch_size=4)
    in_process = data.TrainStream(cfg, rank=0, world_size=1)
    expected = take(in_process, 10)

    with_workers = data.TrainStream(make_cfg(odd_archive, img_size=24, micro_batch_size=4, num_workers=2), 0, 1)
    first = take(with_workers, 3)
    state = with_workers.state_dict()
    del with_workers  # dropping the stream stops its workers, as close() does below
    assert not multiprocessing.active_children()
    resumed = data.TrainStream(make_cfg(odd_archive, img_size=24, micro_batch_size=4, num_workers=2), 0, 1)
    resumed.set_state_dict(state)
    rest = take(resumed, 7)
    assert multiprocessing.active_children()
    resumed.close()
    assert not multiprocessing.active_children()
    assert_same_batches(first + rest, expected)


def test_resume_with_another_world_size_continues_the_global_order(odd_archive, arrays):
    lookup = index_lookup(arrays["train"][0])
    single = data.TrainStream(make_cfg(odd_archive, micro_batch_size=4, **IDENTIFIABLE), 0, 1)
    take(single, 2)
    state = single.state_dict()
    following = indices_of(next(single)[0].numpy(), lookup)

    halves = []
    for rank in range(2):
        stream = data.TrainStream(make_cfg(odd_archive, micro_batch_size=2, **IDENTIFIABLE), rank, 2)
        stream.set_state_dict(state)
        halves.extend(indices_of(next(stream)[0].numpy(), lookup))
    assert halves == following


def test_set_state_dict_accepts_the_minimal_form(odd_archive):
    cfg = make_cfg(odd_archive, micro_batch_size=4)
    stream = data.TrainStream(cfg, 0, 1)
    stream.set_state_dict({"epoch": 2, "batches_in_epoch": 3})
    assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["batches_in_epoch"] == 3
    next(stream)
    assert stream.state_dict()["batches_in_epoch"] == 4


def test_step_sizes_divide_a_step_into_micro_batches_on_every_process():
    for global_batch, micro_batch, world_size in [(64, 32, 1), (64, 32, 2), (64, 8, 2), (96, 4, 3)]:
        sizes = data.StepSizes(global_batch, micro_batch, world_size)
        train_cfg = {"global_batch_size": global_batch, "micro_batch_size": micro_batch}
        assert accumulation_steps(train_cfg, world_size) * micro_batch * world_size == global_batch
        assert sizes.micro_steps_per_epoch(1000) == 1000 // (micro_batch * world_size)


# --- evaluation sharding --------------------------------------------------------------------------


def eval_indices(cfg, split, rank, world_size, lookup):
    """The indices, in order, of the images one rank's eval loader yields (cfg with IDENTIFIABLE)."""
    loader = data.build_eval_loader(cfg, split, rank, world_size)
    return [index for images, _ in loader for index in indices_of(images.numpy(), lookup)]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_cover_every_image_exactly_once(odd_archive, arrays, world_size):
    lookup = index_lookup(arrays["test"][0])
    cfg = make_cfg(odd_archive, eval_batch_size=2, **IDENTIFIABLE)
    shards = [eval_indices(cfg, "test", rank, world_size, lookup) for rank in range(world_size)]
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(itertools.chain(*shards)) == list(range(11))


# --- validation split -----------------------------------------------------------------------------


def test_validation_split_is_disjoint_balanced_and_fixed_by_the_seed(tmp_path):
    path = write_cifar100_archive(tmp_path / "a.tar.gz", 60, 4, num_classes=NUM_CLASSES)
    train_images, train_labels = cifar100_arrays(60, 4, num_classes=NUM_CLASSES)["train"]
    lookup = index_lookup(train_images)
    cfg = make_cfg(path, val_size=23, **IDENTIFIABLE)

    val = eval_indices(cfg, "val", 0, 1, lookup)
    stream = data.TrainStream(make_cfg(path, val_size=23, **IDENTIFIABLE, micro_batch_size=1), 0, 1)
    train = set(itertools.chain(*(indices_of(batch.numpy(), lookup) for batch, _ in take(stream, 37))))
    assert len(val) == len(set(val)) == 23
    assert train.isdisjoint(val) and train | set(val) == set(range(60))

    counts = np.bincount(train_labels[val], minlength=NUM_CLASSES)
    assert counts.max() - counts.min() <= 1  # every class has 6 images, so 2 or 3 of each
    assert eval_indices(cfg, "val", 0, 1, lookup) == val
    assert eval_indices(make_cfg(path, val_size=23, **IDENTIFIABLE, seed=1), "val", 0, 1, lookup) != val


def water_filling_counts(class_sizes, total):
    """Independent statement of "as balanced as possible": repeatedly give one more image to the
    class with the fewest chosen so far among those that still have images."""
    counts = [0] * len(class_sizes)
    for _ in range(total):
        open_classes = [c for c in range(len(class_sizes)) if counts[c] < class_sizes[c]]
        counts[min(open_classes, key=lambda c: counts[c])] += 1
    return sorted(counts)


def test_validation_split_balances_around_a_small_class():
    labels = np.array([0] * 2 + [1] * 20 + [2] * 20 + [3] * 9)
    for val_size in (4, 7, 30, 40):
        chosen = validation_indices(labels, val_size, seed=3, source="test labels")
        counts = np.bincount(labels[chosen], minlength=4)
        assert sorted(counts) == water_filling_counts([2, 20, 20, 9], val_size)
        assert (counts <= [2, 20, 20, 9]).all() and len(set(chosen)) == val_size


# --- digits ---------------------------------------------------------------------------------------


def test_digits_splits_sizes_classes_and_pixels():
    from sklearn.datasets import load_digits

    cfg = make_cfg(None, dataset="digits", micro_batch_size=8)
    test_loader = data.build_eval_loader(make_cfg(None, dataset="digits", eval_batch_size=256), "test", 0, 1)
    test_labels = np.concatenate([labels.numpy() for _, labels in test_loader])
    stream = data.TrainStream(cfg, 0, 1)
    assert stream.num_images == 1497 and len(test_labels) == 300
    assert stream.num_images + len(test_labels) == 1797
    assert np.bincount(test_labels, minlength=10).tolist() == [30] * 10
    assert data.class_names(cfg) == tuple(str(digit) for digit in range(10))

    # The first training image is scikit-learn's first image (a 0, far from the last 30 of its
    # class): 0..16 scaled to 0..255, each pixel a 4x4 block, grey in all three channels.
    source = load_digits()
    expected = np.kron(np.rint(source.images[0] * 255 / 16), np.ones((4, 4)))
    train_set = load_split(data.InputSettings.from_config(cfg), "train")
    assert train_set.images.dtype == np.uint8 and train_set.images.shape == (1497, 3, 32, 32)
    for channel in range(3):
        np.testing.assert_array_equal(train_set.images[0, channel], expected)
    assert train_set.labels[0] == source.target[0]

    images, labels = next(stream)
    assert images.shape == [8, 3, 32, 32] and set(labels.numpy()) <= set(range(10))


def test_more_ranks_than_images_leaves_empty_shards(tmp_path):
    path = write_cifar100_archive(tmp_path / "a.tar.gz", 8, 2, num_classes=NUM_CLASSES)
    lookup = index_lookup(cifar100_arrays(8, 2, num_classes=NUM_CLASSES)["test"][0])
    cfg = make_cfg(path, **IDENTIFIABLE)
    shards = [eval_indices(cfg, "test", rank, 3, lookup) for rank in range(3)]
    assert sorted(len(shard) for shard in shards) == [0, 1, 1]
    assert sorted(itertools.chain(*shards)) == [0, 1]
