"""Process-level device settings: the CPU settings, applied once before the first operator runs, and
waiting for the device to finish its queued work (for timing).

Paddle sets OMP_NUM_THREADS=1 at import when it is unset (and `paddle.distributed.launch` sets it for
every worker), so by default a CPU run uses one core. We size the math thread pool ourselves: the
cores this process may use divided by the processes the launcher started on this node, unless
`train.cpu_threads` says otherwise.

Paddle's CPU wheel multiplies matrices with Intel MKL, which picks a slow generic kernel on AMD
processors. MKL_DEBUG_CPU_TYPE=5 makes it use its AVX2 kernels (a 2048x2048 float32 GEMM on 2
threads of an AMD EPYC: 35 -> 135 GFLOP/s). MKL reads the variable when it first runs, so it is set
here, only on AMD processors and only when the user has not set it.

Two more CPU-only settings, each measured on the ViT training step:
- FLAGS_use_stride_kernel off: transposes are then materialised by a dense kernel instead of becoming
  views that a slow generic strided copy later gathers (80 ms -> 20 ms for one such copy).
- glibc keeps large freed buffers instead of returning them to the OS (mallopt thresholds): Paddle's
  CPU allocator frees every activation, and each fresh mmap costs page faults on first touch (an add
  over 6.4M floats: 16 ms -> 2.4 ms).
"""

import ctypes
import ctypes.util
import logging
import os

import paddle

logger = logging.getLogger(__name__)


def cpu_info(field):
    """The value of `field` (e.g. "vendor_id", "model name") for the first CPU in /proc/cpuinfo, or ""
    where there is no such file or field (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_freed_memory():
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


def processes_on_this_node():
    return int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))


def configure_cpu(threads=None):
    """Set the math threads of this process (auto when None) and the CPU speed settings; returns threads."""
    if paddle.device.get_device() != "cpu":
        return threads
    if cpu_info("vendor_id") == "AuthenticAMD" and "MKL_DEBUG_CPU_TYPE" not in os.environ:
        os.environ["MKL_DEBUG_CPU_TYPE"] = "5"
    paddle.set_flags({"FLAGS_use_stride_kernel": False})
    _keep_freed_memory()
    cores = len(os.sched_getaffinity(0))
    if threads is None:
        threads = max(1, cores // processes_on_this_node())
    elif threads * processes_on_this_node() > cores:
        logger.warning(
            "train.cpu_threads %d x %d process(es) = %d math threads for the %d CPU core(s) this process "
            "may use: the threads will wait for each other. Set train.cpu_threads: null to fit the cores.",
            threads,
            processes_on_this_node(),
            threads * processes_on_this_node(),
            cores,
        )
    os.environ["OMP_NUM_THREADS"] = str(threads)
    paddle.base.core.set_num_threads(threads)
    logger.debug("CPU math threads per process: %d", threads)
    return threads


def wait_for_device():
    """Block until the current device has run everything queued on it, so that a timer read afterwards
    measures the work itself. CPU kernels run synchronously (and `synchronize` rejects "cpu")."""
    if paddle.get_device() != "cpu":
        paddle.device.synchronize()
