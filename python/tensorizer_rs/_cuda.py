"""Loading straight into GPU memory.

Destinations are allocated by PyTorch (``torch.empty`` on the device, so its caching allocator
owns them) or are a module's existing parameters and buffers; the Rust core
(``_native.cuda_load``) reads the file through a bounded pool of pinned staging buffers and
copies into them on its own CUDA streams, ordered after PyTorch's current stream. No copy of the
model is ever made in host memory.

``dtype=`` casts happen on the GPU after the copy, a group of tensors at a time, so the extra GPU
memory they need is bounded by ``CAST_GROUP_BYTES`` (or the largest tensor).

The interface with ``TensorDeserializer`` is explicit: it hands a :class:`Request` (the file,
its index, where and how to load) to :func:`load` or :func:`load_into_module`, and gets a
:class:`Loaded` back, which it files into its own cache. :func:`fits_in_place` is the one rule
for which existing tensors are filled in place (the vLLM loader asks it too, through
``TensorDeserializer.fills_in_place``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from . import _dtypes, _gc, _native
from .exceptions import (
    CryptographyError,
    HashMismatchError,
    TensorizerUnsupportedError,
    TensorizerValueError,
)

__all__ = [
    "Loaded",
    "Request",
    "available",
    "counters",
    "fits_in_place",
    "release_staging",
    "reset_counters",
    "staging",
]

logger = logging.getLogger("tensorizer_rs")

PARAM, BUFFER = 0, 1
#: Bound on the temporary GPU memory used by ``dtype=`` casts (raised to the largest tensor).
CAST_GROUP_BYTES = 256 << 20
#: New tensors up to this size share allocations (one ``torch.empty`` per shape and dtype, split
#: with ``unbind``): per-tensor allocation dominates files of many tiny tensors.
SHARE_MAX_BYTES = 64 << 10
#: New tensors of at least this many bytes in all are allocated out of one block reserved from
#: torch's caching allocator first (see ``_reserve``).
RESERVE_MIN_BYTES = 64 << 20
#: Bytes of one shared allocation.
SHARE_GROUP_BYTES = 4 << 20
#: How local files reach the staging buffers in this process's loads: ``"auto"`` (through the
#: page cache where cached, ``O_DIRECT`` where not), ``"buffered"`` or ``"direct"``; ``None``:
#: ``TENSORIZER_RS_IO``, else ``"auto"``. Tests set it.
IO_MODE: str | None = None


# Plain classes, not dataclasses: building a dataclass costs ~0.5 ms, and this module is imported
# on a fresh process's first CUDA load, inside its time.
class Request:
    """What a CUDA load needs from the deserializer that asks for it."""

    __slots__ = ("crypt", "device", "dtype", "entries", "file", "name", "num_readers", "progress")

    def __init__(
        self,
        file: Any,
        name: str,
        entries: list,
        device: Any,
        dtype: Any = None,
        num_readers: int | None = None,
        crypt: dict | None = None,
        progress: Callable[[int, float], None] | None = None,
    ) -> None:
        self.file = file  #: the ``_native.TensorFile``
        self.name = name  #: for messages
        self.entries = entries  #: the file's index entries (``TensorFile.entries()``)
        self.device = device  #: a ``torch.device``
        self.dtype = dtype  #: ``dtype=`` of the deserializer
        self.num_readers = num_readers
        self.crypt = {} if crypt is None else crypt  #: ``key=`` / ``passphrase=``
        self.progress = progress  #: called with (bytes done, GB/s)


class Loaded:
    """What a CUDA load gives back."""

    __slots__ = ("alloc_seconds", "bytes", "in_place", "module_idx", "seconds", "stats", "tensors")

    def __init__(self) -> None:
        #: New tensors, as Parameters (``requires_grad`` from the stored dtype), by index.
        self.tensors: dict = {}
        #: The module index of every tensor loaded (new or in place), by index.
        self.module_idx: dict = {}
        #: Indices whose existing tensors now hold the file's data.
        self.in_place: set = set()
        self.bytes = 0
        self.seconds = 0.0
        #: The native loads' statistics, in order.
        self.stats: list = []
        #: The time each allocation of new tensors took (benchmarks).
        self.alloc_seconds: list = []


def available() -> tuple:
    """``(True, None)`` if the CUDA driver is usable from the Rust core, else ``(False, why)``."""
    return _native.cuda_available()


def check_available(device: Any) -> None:
    ok, why = _native.cuda_available()
    if not ok:
        raise TensorizerUnsupportedError(f"device {str(device)!r} requested, but {why}")


def counters() -> dict:
    """Process-wide counters of the GPU path (bytes through the pinned pool, copies, ...)."""
    return dict(_native.cuda_counters())


def reset_counters() -> None:
    _native.cuda_reset_counters()


def staging(
    total_bytes: int | None = None, chunk_bytes: int | None = None, pinned: str | None = None
) -> tuple:
    """Read or set the pinned staging pool: ``(total_bytes, chunk_bytes, streams, pinned)``.
    Defaults: 256 MiB (``TENSORIZER_RS_STAGING_BYTES``) in 8 MiB buffers, 4 copy streams;
    ``pinned`` is ``"thp"`` (huge pages, registered; the default) or ``"driver"``
    (cuMemHostAlloc). Buffers are whole multiples of 2 MiB."""
    return _native.cuda_staging(total_bytes, chunk_bytes, None, pinned)


def prewarm_for(device: Any, uri: str | None, num_readers: int | None) -> None:
    """Start making, in the background, the staging buffers a load of ``uri`` to ``device``
    with ``num_readers`` readers will use (the core decides how many: the whole pool for a
    remote source with its default readers, two per reader otherwise), while the caller still
    parses the index, allocates the destinations or builds the model."""
    _native.cuda_prewarm(_ordinal(device), num_readers, uri)


def release_staging(device: int = 0) -> None:
    """Free the idle pinned staging buffers of a device (they come back on the next load)."""
    _native.cuda_release_staging(device)


# ----------------------------------------------------------------------------------------------
_resolved: dict = {}
#: Why encrypted loads decrypted on the host, each logged once.
_host_decrypt_noted: set = set()


def _dtypes_of(entry: dict, target: Any):
    """(final torch dtype as stored, dtype to return, requires_grad) under CoreWeave's rules:
    every dtype but bool is cast to ``target``, except complex to real (upstream PR #207);
    ``requires_grad`` follows the stored dtype."""
    key = (entry["dtype"], target)  # the stored dtype string decides container and torch name
    got = _resolved.get(key)
    if got is None:
        _, final = _dtypes.resolve_torch(entry["container"], entry["torch_dtype"])
        out = final
        cast = target is not None and final != target and str(final) != "torch.bool"
        if cast and not (final.is_complex and not target.is_complex):
            out = target
        got = _resolved[key] = (final, out, final.is_floating_point or final.is_complex)
    return got


def fits_in_place(entry: dict, tensor: Any, device: Any, dtype: Any) -> bool:
    """Whether a load to ``device`` with ``dtype=`` writes index entry ``entry``'s data into
    ``tensor`` itself: same device, shape and (cast) dtype, and contiguous. The one rule, for
    ``load_into_module`` and for callers that free what will not be filled first."""
    return (
        tensor.device == device
        and tuple(tensor.shape) == tuple(entry["shape"])
        and tensor.dtype == _dtypes_of(entry, dtype)[1]
        and tensor.is_contiguous()
    )


def _stream_of(device) -> int:
    import torch

    if device.type != "cuda":
        return 0  # tests drive the pipeline with host memory and a stand-in driver
    return torch.cuda.current_stream(device).cuda_stream


def _ordinal(device) -> int:
    return device.index or 0


class _Run:
    """One call: several native loads (casts go in groups) under one progress report and one
    log line, gathered into a :class:`Loaded`."""

    def __init__(self, req: Request, verify: bool) -> None:
        self.req = req
        self.verify = verify
        self.out = Loaded()
        self.started = time.perf_counter()

    def _progress(self):
        """The native callback for a native load: reports bytes of the whole run."""
        user = self.req.progress
        if user is None:
            return None

        def report(done: int, total: int) -> None:
            run_done = self.out.bytes + done
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            user(run_done, run_done / elapsed / 1e9)

        return report

    def native(self, jobs: list) -> list:
        """Load ``[(index, tensor, data_ptr, nbytes)]`` into the tensors' memory; returns the
        module indices."""
        if not jobs:
            return []
        req = self.req
        _native.trace_mark("native_call", len(jobs))
        module_idx, stats = _native.cuda_load(
            req.file,
            [(i, p, n) for i, _, p, n in jobs],
            _ordinal(req.device),
            _stream_of(req.device),
            num_readers=req.num_readers,
            verify_hash=self.verify,
            io=IO_MODE,
            progress=self._progress(),
            **req.crypt,
        )
        self.out.bytes += stats["bytes"]
        self.out.stats.append(stats)
        why = stats.get("host_decrypt")
        if why and why not in _host_decrypt_noted:
            # One line per reason and process (lazy loads make a native load per tensor).
            _host_decrypt_noted.add(why)
            logger.log(
                logging.WARNING if stats.get("host_decrypt_fallback") else logging.INFO,
                "tensorizer_rs: %s: decrypting on the host, not the GPU: %s",
                req.name,
                why,
            )
        for (i, _, _, _), idx in zip(jobs, module_idx):
            self.out.module_idx[i] = idx
        return module_idx

    def done(self) -> Loaded:
        out = self.out
        out.seconds = time.perf_counter() - self.started
        logger.info(
            "tensorizer_rs: loaded %d tensors (%d bytes) to %s in %.3f s, %.2f GB/s",
            len(out.module_idx),
            out.bytes,
            self.req.device,
            out.seconds,
            out.bytes / max(out.seconds, 1e-9) / 1e9,
        )
        return out


def _load(run: _Run, indices: list, into: dict) -> None:
    """Load ``indices``; ``into`` maps some of them to existing tensors (final dtype and shape,
    contiguous, on the device) to fill in place. The others get new tensors (cast to the
    request's dtype), kept as Parameters in ``run.out.tensors`` (``requires_grad`` from the
    stored dtype)."""
    import torch

    req = run.req
    entries = req.entries
    direct, casts, fresh = [], [], []
    grads = {}
    for i in indices:
        e = entries[i]
        final, target, grads[i] = _dtypes_of(e, req.dtype)
        dest = into.get(i)
        if dest is not None and dest.dtype == final:
            direct.append((i, dest, dest.data_ptr(), e["nbytes"]))
        elif final == target and dest is None:
            fresh.append((i, final))
        else:
            casts.append((i, e, final, target, dest))
    new = {}
    for i, t, _, _ in _load_fresh(run, direct, fresh):
        if i not in into:
            new[i] = t
    # Casts: load a group at its stored dtype into temporaries, then cast on the GPU.
    group, size = [], 0
    limit = max([CAST_GROUP_BYTES] + [c[1]["nbytes"] for c in casts])
    for n, c in enumerate(casts):
        group.append(c)
        size += c[1]["nbytes"]
        if n + 1 == len(casts) or size + casts[n + 1][1]["nbytes"] > limit:
            tmp = _allocate(entries, [(i, final) for i, _, final, _, _ in group], req.device)
            run.native(tmp)
            with torch.no_grad():
                for (i, _e, _f, target, dest), (_, t, _, _) in zip(group, tmp):
                    if dest is not None:
                        dest.copy_(t)
                    else:
                        new[i] = t.to(target)
            del tmp
            group, size = [], 0
    # What torch.nn.Parameter(t, requires_grad) does, without its Python-level __new__.
    make, param = torch.Tensor._make_subclass, torch.nn.Parameter
    for i, t in new.items():
        run.out.tensors[i] = make(param, t, grads[i])
    run.out.in_place.update(into)


def _load_fresh(run: _Run, direct: list, fresh: list) -> list:
    """Load ``direct`` jobs plus new tensors for ``fresh`` = ``[(index, dtype)]``; returns the
    jobs ``[(index, tensor, data_ptr, nbytes)]``."""
    import torch

    req = run.req
    t0 = time.perf_counter()
    _native.trace_mark("alloc_start", len(fresh))
    total = sum(req.entries[i]["nbytes"] for i, _ in fresh)
    reserve = total >= RESERVE_MIN_BYTES and _can_reserve(req.device)
    if reserve:
        before = torch.cuda.memory_reserved(req.device)
        _reserve(total + 512 * len(fresh), req.device)  # torch rounds each allocation to 512
    jobs = direct + _allocate(req.entries, fresh, req.device)
    if reserve and torch.cuda.memory_reserved(req.device) - before > 1.5 * total:
        # The block went unsplit (allocator settings changed at run time): give it back.
        torch.cuda.empty_cache()
    _native.trace_mark("alloc_end", len(fresh))
    run.out.alloc_seconds.append(time.perf_counter() - t0)
    run.native(jobs)
    return jobs


def _can_reserve(device) -> bool:
    """Whether freed memory goes back to torch's own cache, whose large blocks later
    allocations split: not with ``cudaMallocAsync``, ``expandable_segments`` (segments are
    mapped differently) or ``max_split_size_mb`` (larger blocks are never split, so the
    reserved block would sit unused beside the tensors)."""
    import torch

    if device.type != "cuda":
        return False
    conf = (
        ",".join(os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
        .replace(" ", "")
        .lower()
    )
    if "max_split_size_mb" in conf or "expandable_segments:true" in conf:
        return False
    return torch.cuda.get_allocator_backend() == "native"


def _reserve(nbytes: int, device) -> None:
    """Allocate ``nbytes`` in one piece and free it at once into torch's caching allocator:
    the new tensors' own allocations then split that cached block instead of each asking the
    driver (``cudaMalloc`` per tensor took 20–100 ms for a 16 GiB model, slower beside the
    copies; the one allocation takes 2–4 ms). Each tensor keeps its own storage; torch hands
    the memory back to the driver (``empty_cache``) once all of the block's tensors are gone."""
    import torch

    try:
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        return  # no room in one piece: one allocation per tensor, as without it
    del block


def _allocate(entries: list, wanted: list, device) -> list:
    """New device tensors for ``wanted`` = ``[(index, dtype)]``, in that order, as
    ``[(index, tensor, data_ptr, nbytes)]``."""
    import torch

    out, groups = {}, {}
    for i, final in wanted:
        e = entries[i]
        n = e["nbytes"]
        if 0 < n <= SHARE_MAX_BYTES:
            groups.setdefault((final, e["shape"], n), []).append(i)
        else:
            t = torch.empty(e["shape"], dtype=final, device=device)
            out[i] = (i, t, t.data_ptr(), n)
    for (final, shape, n), idx in groups.items():
        per = max(1, SHARE_GROUP_BYTES // n)
        for k in range(0, len(idx), per):
            part = idx[k : k + per]
            if len(part) == 1:
                t = torch.empty(shape, dtype=final, device=device)
                out[part[0]] = (part[0], t, t.data_ptr(), n)
                continue
            block = torch.empty((len(part), *shape), dtype=final, device=device)
            base = block.data_ptr()
            for j, (i, row) in enumerate(zip(part, block.unbind(0))):
                out[i] = (i, row, base + j * n, n)
    return [out[i] for i, _ in wanted]


def load(req: Request, indices: list, verify: bool) -> Loaded:
    """New tensors for ``indices``."""
    run = _Run(req, verify)
    with _gc.paused():
        _load(run, indices, {})
    return run.done()


def load_into_module(
    req: Request, targets: list, rest: list, verify: bool, cached=frozenset()
) -> Loaded:
    """Fill ``targets`` = ``[(index, module, attr)]`` in place where the module already holds a
    tensor that :func:`fits_in_place`; load the others (and ``rest``, tensors the caller still
    owes its cache) into new tensors. Indices in ``cached`` are skipped (already loaded).
    ``Loaded.in_place`` says which targets were filled; the caller registers the others. Raises
    on a shape mismatch before reading anything."""
    import torch

    entries = req.entries
    into = {}
    for i, mod, attr in targets:
        e = entries[i]
        table = mod._parameters if e["tensor_type"] == PARAM else mod._buffers
        old = table.get(attr)
        if old is None or old.device.type == "meta":
            continue
        if tuple(old.shape) != tuple(e["shape"]):
            raise TensorizerValueError(
                f"{req.name}: tensor {e['name']!r}: shape {tuple(e['shape'])} in the file does "
                f"not match {tuple(old.shape)} in the module"
            )
        if i not in cached and fits_in_place(e, old, req.device, req.dtype):
            into[i] = old.data if isinstance(old, torch.nn.Parameter) else old
    todo = [i for i, _, _ in targets if i not in cached]
    seen = set(todo)
    todo += [i for i in rest if i not in cached and i not in seen]
    run = _Run(req, verify)
    try:
        with _gc.paused():
            _load(run, todo, into)
    except (CryptographyError, HashMismatchError) as e:
        if not into:
            raise
        # Tensors filled in place may hold part of the file's data, or ciphertext.
        raise type(e)(
            f"{e} (the module's tensors filled in place now hold undefined contents)"
        ) from e
    return run.done()
