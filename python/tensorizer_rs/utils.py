"""CoreWeave's ``tensorizer.utils``: byte formatting, memory statistics, the default device and
``no_init_or_tensor``. torch is imported when a function needs it, not with the module."""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from typing import Callable, NamedTuple, TypeVar

__all__ = [
    "CPUMemoryUsage",
    "GlobalGPUMemoryUsage",
    "MemoryUsage",
    "TorchGPUMemoryUsage",
    "convert_bytes",
    "get_device",
    "get_gpu_name",
    "get_mem_usage",
    "no_init_or_tensor",
]


def convert_bytes(num, decimal=True) -> str:
    """Format a byte count as ``<n> <unit>``: ``"123.4 MB"`` (decimal, the default) or
    ``"117.7 MiB"`` (binary), as CoreWeave does."""
    if decimal:
        step_unit = 1000.0
        units = ("bytes", "KB", "MB", "GB", "TB", "PB")
    else:
        step_unit = 1024.0
        units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")
    for unit in units[:-1]:
        if num < step_unit:
            break
        num /= step_unit
    else:
        unit = units[-1]
    return f"{num:3.1f} {unit}"


def get_device():
    """``torch.device("cuda")`` when CUDA is available, else ``torch.device("cpu")``."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class GlobalGPUMemoryUsage(NamedTuple):
    """Memory use of one GPU across all processes, in bytes."""

    total: int
    free: int
    used: int

    @classmethod
    def now(cls, device=None) -> GlobalGPUMemoryUsage | None:
        """A snapshot for ``device`` (default: the current GPU), or None without CUDA."""
        if not _cuda_available():
            return None
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return cls(total, free, total - free)

    def __str__(self):
        return (
            f"GPU: (U: {self.used >> 20:,}MiB F: {self.free >> 20:,}MiB T: {self.total >> 20:,}MiB)"
        )


class TorchGPUMemoryUsage(NamedTuple):
    """PyTorch's own memory use on one GPU, in bytes (current and peak)."""

    reserved: int
    reserved_max: int
    used: int
    used_max: int

    @classmethod
    def now(cls, device=None) -> TorchGPUMemoryUsage | None:
        """A snapshot for ``device`` (default: the current GPU), or None without CUDA."""
        if not _cuda_available():
            return None
        import torch

        stats = torch.cuda.memory.memory_stats(device)
        return cls(
            stats.get("reserved_bytes.all.current", 0),
            stats.get("reserved_bytes.all.peak", 0),
            stats.get("allocated_bytes.all.current", 0),
            stats.get("allocated_bytes.all.peak", 0),
        )

    def __str__(self):
        return f"TORCH: (R: {self.reserved >> 20:,}MiB/{self.reserved_max >> 20:,}MiB, A: {self.used >> 20:,}MiB/{self.used_max >> 20:,}MiB)"


def _available_ram() -> int:
    """Bytes of RAM available to new allocations (psutil's ``available``)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return psutil.virtual_memory().available
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class CPUMemoryUsage(NamedTuple):
    """Peak resident memory of this process (and its children) and available RAM, in bytes."""

    maxrss: int
    free: int

    @classmethod
    def now(cls) -> CPUMemoryUsage:
        """A snapshot; ``maxrss`` comes from ``getrusage(2)`` (1 KiB granularity)."""
        try:
            import resource
        except ImportError:  # not on Windows
            resource = None
        if resource is not None:
            maxrss = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            ) << 10
        else:
            import psutil

            process = psutil.Process()
            maxrss = process.memory_info().rss + sum(
                p.memory_info().rss for p in process.children(True)
            )
        return cls(maxrss, _available_ram())

    def __str__(self):
        return f"CPU: (maxrss: {self.maxrss >> 20:,}MiB F: {self.free >> 20:,}MiB)"


class MemoryUsage(NamedTuple):
    """CPU, whole-GPU and PyTorch memory statistics together (``gpu``/``torch`` are None
    without CUDA)."""

    cpu: CPUMemoryUsage
    gpu: GlobalGPUMemoryUsage | None
    torch: TorchGPUMemoryUsage | None

    @classmethod
    def now(cls, device=None):
        """A snapshot of all three for ``device`` (default: the current GPU)."""
        gpu_info = torch_info = None
        try:
            gpu_info = GlobalGPUMemoryUsage.now(device)
            torch_info = TorchGPUMemoryUsage.now(device)
        except AssertionError:
            pass
        return cls(CPUMemoryUsage.now(), gpu_info, torch_info)

    def __str__(self):
        return " ".join(str(item) for item in self if item)


def get_mem_usage() -> str:
    """``str(MemoryUsage.now())``, e.g. ``"CPU: (maxrss: 1,234MiB F: 20,000MiB)"``."""
    return str(MemoryUsage.now())


def get_gpu_name() -> str:
    """The current CUDA device's name, or ``"N/A"``."""
    if _cuda_available():
        import torch

        return torch.cuda.get_device_name()
    return "N/A"


Model = TypeVar("Model")


def no_init_or_tensor(
    loading_code: Callable[..., Model] | None = None,
) -> Model | contextlib.AbstractContextManager:
    """Skip weight initialisation while building a model: ``reset_parameters`` of
    ``nn.Linear`` / ``nn.Embedding`` / ``nn.LayerNorm`` does nothing and ``torch.empty``
    allocates on the meta device. Pass a callable to run it so, or nothing for a context
    manager. Thread- and async-safe and re-entrant, as CoreWeave's."""
    if loading_code is None:
        return _NoInitOrTensorImpl.context_manager()
    elif callable(loading_code):
        with _NoInitOrTensorImpl.context_manager():
            return loading_code()
    else:
        raise TypeError(
            "no_init_or_tensor() expected a callable to evaluate,"
            " or None if being used as a context manager;"
            f' got an object of type "{type(loading_code).__name__}" instead.'
        )


class _NoInitOrTensorImpl:
    # torch functions are patched process-wide while any context is active; the patched
    # versions act only where this context variable is set (other threads are unaffected).
    is_active = contextvars.ContextVar("_NoInitOrTensorImpl.is_active", default=False)
    _count_active = 0
    _count_active_lock = threading.Lock()
    _originals: tuple | None = None  # (torch.empty, ((module class, reset_parameters), ...))

    @classmethod
    @contextlib.contextmanager
    def context_manager(cls):
        if cls.is_active.get():
            yield
            return
        import torch

        with cls._count_active_lock:
            cls._count_active += 1
            if cls._count_active == 1:
                modules = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm)
                cls._originals = (torch.empty, tuple((m, m.reset_parameters) for m in modules))
                for m in modules:
                    m.reset_parameters = cls._disable(m.reset_parameters)
                torch.empty = cls._meta_empty
        reset_token = cls.is_active.set(True)
        try:
            yield
        finally:
            cls.is_active.reset(reset_token)
            with cls._count_active_lock:
                cls._count_active -= 1
                if cls._count_active == 0:
                    empty, modules = cls._originals
                    torch.empty = empty
                    for m, original in modules:
                        m.reset_parameters = original
                    cls._originals = None

    @staticmethod
    def _disable(func):
        def wrapper(*args, **kwargs):
            if not _NoInitOrTensorImpl.is_active.get():
                return func(*args, **kwargs)

        return wrapper

    @staticmethod
    def _meta_empty(*args, **kwargs):
        if _NoInitOrTensorImpl.is_active.get():
            kwargs["device"] = "meta"
        return _NoInitOrTensorImpl._originals[0](*args, **kwargs)

    __init__ = None
