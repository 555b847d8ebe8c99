"""Use a real BLAS under MLX's Linux CPU backend.

MLX's Linux CPU wheel links a bundled reference BLAS: float32 matmuls run 30x slower than
with OpenBLAS (docs/benchmarks.md). Preloading Debian's OpenBLAS (package
libopenblas0-pthread) replaces those symbols. A process can only preload
at exec time, so entry points that will run models call `reexec_with_openblas()` before
importing MLX: on Linux, when the library exists and is not loaded yet, the process
re-executes itself once with LD_PRELOAD set. Nothing happens on macOS (Accelerate/Metal),
when NIGHTINGALE_NO_OPENBLAS=1, or when the library is missing.
"""

from __future__ import annotations

import functools
import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
OPT_OUT = "NIGHTINGALE_NO_OPENBLAS"
MARKER = "NIGHTINGALE_OPENBLAS_REEXEC"


def openblas_path() -> str | None:
    return next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)


@functools.cache
def fast_blas_loaded() -> bool:
    """Does MLX's CPU backend multiply with a fast BLAS in this process? Always off Linux
    (Accelerate on macOS); on Linux only when OpenBLAS is mapped (see reexec_with_openblas)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        with open("/proc/self/maps") as maps:
            return any("libopenblas" in line for line in maps)
    except OSError:
        return False


def needs_reexec() -> bool:
    """Would `reexec_with_openblas` re-execute this process?"""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "1" or os.environ.get(MARKER):
        return False
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return False
    # once MLX is imported it is too late to matter; never exec a process mid-run
    return openblas_path() is not None and "mlx" not in sys.modules


def reexec_with_openblas(argv: list[str] | None = None) -> None:
    """Re-exec this process with OpenBLAS preloaded (Linux only; at most once)."""
    if not needs_reexec():
        return
    lib = openblas_path()
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
    env[MARKER] = "1"
    args = argv if argv is not None else [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, env)
