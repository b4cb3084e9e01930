"""Joining a multi-process job leaves out Paddle's messages that ask nothing of the user (the flags
banner and fleet's warning about other ranks' groups) and keeps everything else on stderr. Given the
calls Paddle makes while joining, in one process; tests/test_train.py runs the launcher itself."""

import sys
import warnings

from rdrop import distributed

import paddle
import pytest
from paddle.distributed import parallel


@pytest.fixture
def a_modified_flag():
    saved = paddle.get_flags(["FLAGS_use_stride_kernel"])
    default = paddle.base.core.globals().get_default("FLAGS_use_stride_kernel")
    paddle.set_flags({"FLAGS_use_stride_kernel": not default})
    yield
    paddle.set_flags(saved)


def test_the_flags_banner_is_left_out_and_other_output_kept(a_modified_flag, capsys):
    with distributed._without_setup_chatter():
        sys.stderr.write("before\n")
        parallel._print_modified_flags(parallel._get_modified_flags())  # what init_parallel_env prints
        sys.stderr.write("after\n")
    assert capsys.readouterr().err == "before\nafter\n"
    parallel._print_modified_flags(parallel._get_modified_flags())
    assert "FLAGS_use_stride_kernel" in capsys.readouterr().err  # outside joining, Paddle's own behaviour


def test_the_warning_about_other_ranks_groups_is_left_out_and_other_warnings_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with distributed._without_setup_chatter():
            warnings.warn("Current global rank 1 is not in group _default_pg10", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["something else"]
