"""Helpers shared by the benchmark scripts: timing, memory, workers, tables, machine.

Import this after `nightingale.blas.reexec_with_openblas()` has run (it imports no MLX at
module level, so importing it first is harmless too). Nothing here is a timed test: the
scripts print tables whose figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
# The PyTorch reference's interpreter: tools/make_reference_env.sh makes .ref-venv in the checkout.
REFERENCE_PYTHON = os.environ.get("NIGHTINGALE_REFERENCE_PYTHON", str(REPO / ".ref-venv" / "bin" / "python"))
MB = 2**20
WORKER_FLAG = "--worker"


# -- time ---------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds). fn must force its own evaluation (mx.eval) for MLX work."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def rate(times: Sequence[float]) -> float:
    """Events per second from event timestamps (len - 1 intervals); NaN with fewer than 2."""
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


# -- memory -------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process, MB (Linux /proc; else the maximum)."""
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else max_rss_mb()


def max_rss_mb() -> float:
    """Peak resident set size of this process, MB."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def mlx_memory_mb() -> dict[str, float]:
    """MLX's allocator: active, peak (since the last reset) and cache, MB."""
    import mlx.core as mx

    return {"active": mx.get_active_memory() / MB, "peak": mx.get_peak_memory() / MB, "cache": mx.get_cache_memory() / MB}


def reset_mlx_peak() -> None:
    import mlx.core as mx

    mx.reset_peak_memory()


def dir_bytes(path: Path, suffix: str = "") -> int:
    """Total size of the files directly in `path` whose names end with `suffix`."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file() and p.name.endswith(suffix))


# -- the machine --------------------------------------------------------------------------


def openblas_active() -> bool:
    """Is an OpenBLAS library mapped into this process (nightingale.blas preloads it)?"""
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def machine() -> dict[str, Any]:
    """What the figures were measured on (call in a worker that has imported MLX)."""
    import mlx.core as mx

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "?"),
        "device": str(mx.default_device()),
        "openblas": openblas_active(),
    }
    gpu = _gpu_name()
    if gpu:
        info["gpu"] = gpu
    return info


def describe_machine(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    memory = f", {info['memory_gb']:.0f} GB" if info.get("memory_gb") else ""
    return (f"{info['cpu']} ({info['cpus']} CPUs{memory}){gpu}; {info['os']}; Python {info['python']}; "
            f"MLX {info['mlx']} on {info['device']}; OpenBLAS preloaded: {'yes' if info['openblas'] else 'no'}")


# -- workers ------------------------------------------------------------------------------


def emit(result: dict) -> None:
    """A worker's answer: one JSON line, last on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def run_worker(argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run a worker process; return the JSON object on its last stdout line."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise RuntimeError(f"worker {' '.join(argv[1:4])} ... failed with exit status {proc.returncode}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError("worker printed no result")
    return json.loads(lines[-1])


def import_reference_t3_only() -> None:
    """Make `chatterbox` a bare namespace so importing chatterbox.models.t3 skips the
    package's __init__ (which imports the whole TTS and VC pipelines and their audio
    dependencies, absent on a GPU machine); the T3 code itself is the reference's, unchanged."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("chatterbox")
    package = types.ModuleType("chatterbox")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["chatterbox"] = package


def reference_env() -> dict[str, str]:
    """Environment for a PyTorch reference worker: one thread, no preloaded BLAS of ours."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("LD_PRELOAD", None)
    env.pop("PYTHONPATH", None)
    return env


# -- tables -------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: '-' for None/NaN, fixed digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "-"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    """A GitHub markdown table; numeric columns are right-aligned (default: all but the first)."""
    numeric = list(numeric) if numeric is not None else [False] + [True] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
