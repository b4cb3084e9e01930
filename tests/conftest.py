"""Fixtures shared by the test modules."""

import pytest
from cifar_archive import write_cifar100_archive


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    """A tiny CIFAR-100 archive in the official format: 48 training and 21 test images."""
    return write_cifar100_archive(
        tmp_path_factory.mktemp("cifar") / "cifar-100-python.tar.gz", num_train=48, num_test=21
    )
