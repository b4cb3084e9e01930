"""Process-level CPU settings, applied once before the first operator runs.

Paddle sets OMP_NUM_THREADS=1 at import when it is unset (and `paddle.distributed.launch` sets it for
every worker), so by default a CPU run uses one core. We size the math thread pool ourselves: the
cores this process may use divided by the processes the launcher started on this node, unless
`train.cpu_threads` says otherwise.

Paddle's CPU wheel multiplies matrices with Intel MKL, which picks a slow generic kernel on AMD
processors. MKL_DEBUG_CPU_TYPE=5 makes it use its AVX2 kernels (a 2048x2048 float32 GEMM on 2
threads of an AMD EPYC: 35 -> 135 GFLOP/s). MKL reads the variable when it first runs, so it is set
here, only on AMD processors and only when the user has not set it.
"""
import logging
import os

import paddle

logger = logging.getLogger(__name__)


def _cpu_vendor():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def processes_on_this_node():
    return int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))


def configure_cpu(threads=None):
    """Set the math threads of this process (auto when None) and MKL's kernel choice; returns threads."""
    if _cpu_vendor() == "AuthenticAMD" and "MKL_DEBUG_CPU_TYPE" not in os.environ:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    if threads is None:
        threads = max(1, len(os.sched_getaffinity(0)) // processes_on_this_node())
    os.environ["OMP_NUM_THREADS"] = str(threads)
    paddle.base.core.set_num_threads(threads)
    logger.debug("CPU math threads per process: %d", threads)
    return threads
