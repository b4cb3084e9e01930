"""Process-level device settings, applied once before the first operator runs, and waiting for the
device to finish its queued work (for timing).

On the CPU only: math threads = usable cores / processes on this machine (Paddle would use one),
MKL's AVX2 kernels on AMD processors (MKL_DEBUG_CPU_TYPE=5, unless set), dense transposes
(FLAGS_use_stride_kernel off), and glibc keeping freed buffers. Why, with the measurements:
docs/performance.md.
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
