"""How the probe uses the CPU: OpenMP wait policy, thread count and compute dtype.

Measured on a 2-core runner, MiniLM-L6-sized classifier, 400 rows (benchmarks/bench_probe.py): with a busy-loop
process on the other core, 2 OpenMP threads under the default (spinning) wait policy ran at 0.43x of 1 thread
(a single-row forward 170 ms instead of 22 ms), because every parallel region waits for the thread that shares its
core with the neighbour while the other spins. With ``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep instead: 2
threads ran at 0.93x of 1 thread with the busy neighbour and 1.8x of it on the idle machine. libgomp reads the
variable once, when torch is imported, so ``prepare_process_env`` must run before the first ``import torch``
(``cli.main`` calls it first thing). The probe itself goes further: it runs one batch per chosen thread at
once, each on a single thread (probe.BatchRunner), which kept 1.22x of one thread's speed with the busy
neighbour and avoids the barriers altogether; PASSIVE still serves the passes that use intra-op threads.

glibc hands freed memory back to the kernel (blocks over its mmap threshold, and the top of the heap past its
trim threshold), so each layer's fresh activations (a 32-row batch's 1536-wide FFN output is 7 MB) page-faulted
in again: about 15,000 minor faults per MiniLM-sized
forward, 8-10% of its time. ``keep_freed_memory`` serves blocks up to 32 MB from the heap and keeps freed memory
for reuse; peak memory stays bounded by the batch shapes, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
from pathlib import Path

DTYPES = ("fp32", "bf16")

# Batches of at most 64 rows and 1,536 padded tokens: on a 2-core runner (MiniLM-sized model, benchmarks/
# bench_probe.py) this ran 5-7% faster than 32 rows a batch, because short rows then fill matmuls big enough to
# run near the machine's peak, while long rows keep the activations small.
DEFAULT_BATCH_ROWS = 64
DEFAULT_BATCH_TOKENS = 1536
SEED_MAX = 2**32 - 1  # numpy's seeds: --seed and diagnose(seed=)


def prepare_process_env() -> None:
    """Set the OpenMP wait policy before torch is imported (an explicit setting by the user wins) and keep freed
    memory in the process (see ``keep_freed_memory``)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """glibc only: allocate blocks below ``mmap_threshold`` from the heap and return freed memory to the kernel
    only above ``trim_threshold``, so activations reuse pages instead of faulting them in on every forward.
    Returns whether it applied; a ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` set by the user wins."""
    if not sys.platform.startswith("linux") or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # not glibc (musl): leave its allocator alone
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


@contextlib.contextmanager
def one_blas_thread():
    """numpy/scipy's BLAS on one thread inside the block (torch's own threads are left alone).

    The analysis after the probe works on small matrices (a few thousand rows of pooled features), where
    OpenBLAS's threads cost more than they gain: on a 2-core runner the 5-fold logistic-regression probe on
    2,000 x 384 features took 15.7 s with 2 BLAS threads and 2.3 s with one, to the same predictions."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int:
    """Distinct (package, core) pairs among ``cpus``: hyperthread siblings share one core's FMA units."""
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return len(cores) or len(cpus)


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (containers, CI runners), or None when there is none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())  # cgroup v1
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """Physical cores this process may run on: CPU affinity, hyperthreads folded, cgroup quota applied."""
    cores = _physical_cores(_affinity())
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """The intra-op thread count and why: ``--threads``, else ``OMP_NUM_THREADS`` (torchrun sets 1 when it
    starts several processes per node), else the available physical cores shared among this node's processes."""
    if requested:
        return int(requested), "--threads"
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    local = int(local) if local.isdigit() and int(local) > 0 else 1
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        why = "OMP_NUM_THREADS"
        cores = available_cores() if local > 1 else 0
        if int(env) * local < cores:  # torchrun sets 1 per process unless told otherwise
            why += (f" (with {local} processes on this node {int(env) * local} of {cores} cores are used; "
                    f"--threads {cores // local} would use them all)")
        return int(env), why
    cores = available_cores()
    why = f"{cores} physical core(s) available" + (f" / {local} processes on this node" if local > 1 else "")
    return max(1, cores // local), why


def apply_threads(requested: int | None = None) -> dict:
    """Set torch's intra-op threads; return what was chosen (for the report's metadata)."""
    import torch

    n, why = choose_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return {"threads": n, "threads_reason": why, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}


def torch_dtype(name: str | None):
    import torch

    if name in (None, "fp32", "float32"):
        return torch.float32
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")


def bf16_fast() -> bool:
    """Whether this CPU has native bf16 matmul (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def model_device(model):
    """The device of the model's first parameter (the CPU for a model without parameters); inputs built on the
    CPU go there before a forward."""
    import torch

    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def cast_model(model, dtype):
    """Run ``model`` in ``dtype`` inside the block; afterwards its original parameters and buffers are back,
    bit for bit (the fp32 tensors are kept, not round-tripped through bf16), so an fp32 pass can follow."""
    import torch

    if dtype is None or dtype == torch.float32:
        yield model
        return
    params = {name: p.data for name, p in model.named_parameters()}
    buffers = [(module, name, buf) for module in model.modules() for name, buf in module._buffers.items()
               if buf is not None]
    model.to(dtype)
    try:
        yield model
    finally:
        for name, p in model.named_parameters():
            p.data = params[name]
        for module, name, buf in buffers:
            module._buffers[name] = buf

