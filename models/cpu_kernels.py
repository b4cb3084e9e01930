"""The compiled CPU kernels of cpu_kernels.cc: layer norm, exact GELU and dropout in float32.

They are built with the machine's C++ compiler on first use (about 25 s, once per machine and
source version) into Paddle's extension directory (`PADDLE_EXTENSION_DIR`, default
~/.cache/paddle_extensions), under a name that hashes the source, the flags, the instruction sets
`-march=native` selects on this CPU and the Paddle version, so a changed source or another CPU gets
its own build. Processes that start together (the launcher's ranks) build once: the
others wait on a file lock. When the build fails (no compiler, say), `kernels()` logs why once
and returns None, and models/layers.py uses Paddle's kernels instead.
"""

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import pathlib
import subprocess
import tempfile

import paddle

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
# -fno-math-errno / -fno-trapping-math let GCC vectorise floor and the clamps in the GELU's exp.
COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
_PADDLE_LIBS = pathlib.Path(paddle.__file__).parent / "libs"
# OpenMP from the libiomp5 Paddle ships (MKL's runtime), not GCC's libgomp: one thread pool for
# MKL and these kernels, sized by paddle.set_num_threads, instead of two pools competing for cores.
LINK_FLAGS = [f"-L{_PADDLE_LIBS}", "-liomp5", f"-Wl,-rpath,{_PADDLE_LIBS}"]


def _native_target():
    """What -march=native means on this CPU, as the compiler's predefined macros (__AVX2__, ...): a
    build for one CPU may crash on another that shares the extension folder (a shared home folder)."""
    compiler = os.environ.get("CXX", "c++")  # the compiler Paddle's builder uses
    command = [compiler, *COMPILE_FLAGS, "-E", "-dM", "-x", "c++", os.devnull]
    return subprocess.run(command, capture_output=True, check=True).stdout


def build_name():
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        " ".join(COMPILE_FLAGS + LINK_FLAGS).encode(),
        _native_target(),
        paddle.__version__.encode(),
    ):
        digest.update(part)
    return f"rdrop_cpu_kernels_{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _captured_output():
    """Paddle's builder prints compiler and setuptools output on file descriptors 1 and 2; keep it,
    to show only when the build fails."""
    with tempfile.TemporaryFile(mode="w+") as capture:
        saved = [os.dup(1), os.dup(2)]
        try:
            for descriptor in (1, 2):
                os.dup2(capture.fileno(), descriptor)
            yield capture
        finally:
            for descriptor, original in zip((1, 2), saved):
                os.dup2(original, descriptor)
                os.close(original)


def _build_and_load(name):
    # Imported here: the module pulls in setuptools, which only a build needs.
    from paddle.utils.cpp_extension import extension_utils, load

    directory = pathlib.Path(extension_utils.get_build_directory())
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        library = directory / name / f"{name}.so"
        if library.exists():
            with _captured_output():
                try:
                    # Load the library directly: `load` would re-run setuptools (2 s). Paddle registers
                    # the operators once per process, so this runs once (kernels() is cached).
                    return extension_utils._import_module_from_library(name, str(library.parent))
                except Exception:  # e.g. a build killed while linking: build it again
                    pass
        # Outside the capture, so the console says why it is silent for the next 25 s.
        logger.info("Compiling the CPU kernels (models/cpu_kernels.cc) once: ~25 s on a quiet machine, 66 s under load")
        with _captured_output() as output:
            try:
                return load(
                    name=name,
                    sources=[str(SOURCE)],
                    extra_cxx_cflags=COMPILE_FLAGS,
                    extra_ldflags=LINK_FLAGS,
                    build_directory=str(directory),
                )
            except Exception as error:
                output.seek(0)
                raise RuntimeError(f"{error}\n{output.read()[-4000:]}") from error


@functools.cache
def kernels():
    """The loaded kernel module (functions rdrop_layer_norm, rdrop_gelu, rdrop_dropout), or None
    when they cannot be built here."""
    try:
        return _build_and_load(build_name())
    except Exception as error:  # a missing or failing compiler must not stop training: fall back
        logger.warning(
            "The CPU kernels in models/cpu_kernels.cc could not be built, so Paddle's slower "
            "kernels are used. Set model.cpu_kernels: false to skip the attempt. Reason: %s",
            error,
        )
        return None
