"""Data parallelism through Paddle's fleet, and the few collectives the recipe needs.

One process per device, started by `python -m paddle.distributed.launch` (or a plain `python` for one
process). Every rank runs the same code; only rank 0 writes files. Collectives here are all-reduces of
small tensors, so they work the same over NCCL on GPUs and gloo on CPUs.
"""

import contextlib
import logging
import os
import re
import sys
import warnings

from rdrop.errors import PeerLost

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

logger = logging.getLogger(__name__)


class Context:
    """This process's place in the job: `rank`, `world_size`, `is_main` (rank 0, the only writer) and
    `is_node_main` (the first process on its machine, which fills per-machine caches)."""

    def __init__(self, rank, world_size, local_rank=0):
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        self.is_node_main = local_rank == 0


def init(use_fleet=True):
    """Join the collective job when the launcher started several processes; returns the Context.

    Training needs fleet (for `fleet.distributed_model`). Evaluation only all-reduces in the default
    group, so it passes use_fleet=False and joins with `init_parallel_env`, without fleet's extra
    groups, which sometimes fail to connect over gloo (docs/performance.md).
    """
    if dist.get_world_size() > 1:
        with _without_setup_chatter():
            if use_fleet:
                fleet.init(is_collective=True, log_level="WARNING")  # not its INFO lines on its topology
            else:
                dist.init_parallel_env()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("PADDLE_LOCAL_RANK", "0")))


class _WithoutFlagsBanner:
    """sys.stderr without the banner joining writes of every Paddle flag that differs from its default
    (rdrop/runtime.py changes one on purpose): its two rules, its `FLAGS(...)` lines and their newlines."""

    def __init__(self, stream):
        self._stream = stream
        self._in_banner = False

    def write(self, text):
        if "Modified FLAGS detected" in text:
            self._in_banner = True
        if not self._in_banner:
            return self._stream.write(text)
        if text.startswith("=") and "Modified FLAGS" not in text:
            self._in_banner = False  # the closing rule
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _without_setup_chatter():
    """Joining the job without Paddle's messages that ask nothing of the user: the flags banner, and
    fleet's warning, on every rank, that the rank is not in the other ranks' one-rank groups of its
    hybrid-parallel topology."""
    stderr = sys.stderr
    sys.stderr = _WithoutFlagsBanner(stderr)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Current global rank \d+ is not in group", category=UserWarning)
            yield
    finally:
        sys.stderr = stderr


def wrap(model, optimizer, context):
    """fleet's data-parallel model (gradients all-reduced and averaged in backward) and optimizer.

    Paddle's DataParallel broadcasts rank 0's parameters when it wraps the model, so every rank starts
    from the same weights. A single process keeps the plain model (fleet's single-process wrapper
    expects a pipeline model in Paddle 3.3).
    """
    if context.world_size == 1:
        return model, optimizer
    return fleet.distributed_model(model), fleet.distributed_optimizer(optimizer)


def no_sync(model, context):
    """Skip the gradient all-reduce of a micro-step whose gradients are only accumulated."""
    if context.world_size == 1:
        return contextlib.nullcontext()
    return model.no_sync()


_PEER_FAILURE = re.compile(r"gloo|nccl|pair_rank|Connection (closed|reset)|TIMEOUT", re.IGNORECASE)


@contextlib.contextmanager
def peers_expected(context):
    """A collective that fails because another process died becomes one clear message, not a traceback."""
    try:
        yield
    except RuntimeError as error:
        if context.world_size == 1 or not _PEER_FAILURE.search(str(error)):
            raise
        lost = re.search(r"pair_rank = (\d+)", str(error))
        who = f"rank {lost.group(1)}" if lost else "another rank"
        raise PeerLost(
            f"Rank {context.rank} lost contact with {who} during a collective operation ({error}). "
            f"That process died or was killed; the job cannot continue. Restart it with "
            f"-o train.resume=auto to continue from the last checkpoint."
        ) from None


def barrier(context):
    if context.world_size > 1:
        with peers_expected(context):
            dist.barrier()


def broadcast_from_main(value, context):
    """Rank 0's `value` (any picklable object) on every rank."""
    if context.world_size == 1:
        return value
    box = [value]
    with peers_expected(context):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, context):
    """Every rank's `value` (any picklable object), as a list indexed by rank, on every rank."""
    if context.world_size == 1:
        return [value]
    gathered = []
    with peers_expected(context):
        dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor, context):
    if context.world_size > 1:
        with peers_expected(context):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor, context):
    if context.world_size > 1:
        with peers_expected(context):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def parameter_checksums(model, context):
    """Every rank's float64 sum of |parameters| (cheap: one reduction per parameter, no copies to host).

    Data parallelism keeps the ranks' weights identical; logging these at each evaluation makes any
    drift visible at once instead of as a mysterious accuracy gap.
    """
    local = paddle.zeros([1], dtype="float64")
    for parameter in model.parameters():
        local += parameter.abs().sum().astype("float64")
    per_rank = paddle.zeros([context.world_size], dtype="float64")
    per_rank[context.rank] = local
    return np.asarray(all_reduce_sum(per_rank, context).numpy())
