"""Loading straight into GPU memory.

Destinations are allocated by PyTorch (``torch.empty`` on the device, so its caching allocator
owns them) or are a module's existing parameters and buffers; the Rust core
(``_native.cuda_load``) reads the file through a bounded pool of pinned staging buffers and
copies into them on its own CUDA streams, ordered after PyTorch's current stream. No copy of the
model is ever made in host memory.

``dtype=`` casts happen on the GPU after the copy, a group of tensors at a time, so the extra GPU
memory they need is bounded by ``CAST_GROUP_BYTES`` (or the largest tensor).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from . import _dtypes, _gc, _native
from .exceptions import TensorizerUnsupportedError, TensorizerValueError

__all__ = [
    "available",
    "counters",
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
#: A/B switch for benchmarks: all new tensors of one native load as views of one allocation.
ALLOC_ONE_BLOCK = False
#: Options passed to every native load (benchmarks and tests set ``io`` and ``register_readers``).
load_options: dict = {}


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
    Defaults: 256 MiB in 8 MiB buffers, 4 copy streams (env ``TENSORIZER_RS_STAGING_BYTES`` /
    ``_CHUNK`` / ``_STREAMS``);
    ``pinned`` is ``"driver"`` (cuMemHostAlloc) or ``"thp"`` (huge pages, registered; env
    ``TENSORIZER_RS_PINNED``). Buffers are whole multiples of 2 MiB."""
    return _native.cuda_staging(total_bytes, chunk_bytes, None, pinned)


def prewarm(device: Any, readers: int | None) -> None:
    """Start making the staging buffers a load to ``device`` with ``readers`` readers will use
    (two per reader for a local file), in the background, while the caller still parses the
    index and allocates the destinations."""
    _native.cuda_prewarm(_ordinal(device), readers)


def prewarm_for(device: Any, uri: str | None, num_readers: int | None) -> None:
    """`prewarm` for a load of `uri`: a remote load takes the whole pool, a local one the
    buffers of `num_readers` readers (default: the native default)."""
    remote = num_readers is None and uri is not None and "://" in uri
    prewarm(device, 1 << 16 if remote else num_readers)


def release_staging(device: int = 0) -> None:
    """Free the idle pinned staging buffers of a device (they come back on the next load)."""
    _native.cuda_release_staging(device)


# ----------------------------------------------------------------------------------------------
_resolved: dict = {}


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


def _stream_of(device) -> int:
    import torch

    if device.type != "cuda":
        return 0  # tests drive the pipeline with host memory and a stand-in driver
    return torch.cuda.current_stream(device).cuda_stream


def _ordinal(device) -> int:
    return device.index or 0


class _Run:
    """One deserializer call: several native loads (casts go in groups) under one progress
    report and one log line."""

    def __init__(self, deser, verify: bool) -> None:
        self.deser = deser
        self.verify = verify
        self.bytes = 0
        self.tensors = 0
        self.started = time.perf_counter()
        self.stats: list = []
        self.alloc_seconds: list = []  # each allocation of new tensors in the run, for benchmarks
        self.user = getattr(deser, "_progress", None)

    def _progress(self):
        """The native callback for a native load: reports bytes of the whole run."""
        if self.user is None:
            return None

        def report(done: int, total: int) -> None:
            run_done = self.bytes + done
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.user(run_done, run_done / elapsed / 1e9)

        return report

    def native(self, jobs: list) -> list:
        """Load ``[(index, tensor, data_ptr, nbytes)]`` into the tensors' memory; returns the
        module indices."""
        if not jobs:
            return []
        d = self.deser
        _native.trace_mark("native_call", len(jobs))
        module_idx, stats = _native.cuda_load(
            d._file,
            [(i, p, n) for i, _, p, n in jobs],
            _ordinal(d._device),
            _stream_of(d._device),
            num_readers=d._num_readers,
            verify_hash=self.verify,
            progress=self._progress(),
            **d._crypt,
            **load_options,
        )
        self.bytes += stats["bytes"]
        self.tensors += len(jobs)
        self.stats.append(stats)
        return module_idx

    def done(self) -> None:
        d = self.deser
        seconds = time.perf_counter() - self.started
        d.total_tensor_bytes += self.bytes
        d.total_bytes_read += self.bytes
        d._seconds += seconds
        d._cuda_stats = self.stats
        d._cuda_alloc_seconds = self.alloc_seconds
        logger.info(
            "tensorizer_rs: loaded %d tensors (%d bytes) to %s in %.3f s, %.2f GB/s",
            self.tensors,
            self.bytes,
            d._device,
            seconds,
            self.bytes / max(seconds, 1e-9) / 1e9,
        )


def _load(run: _Run, indices: list, into: dict) -> tuple[dict, dict]:
    """Load ``indices``; ``into`` maps some of them to existing tensors (final dtype and shape,
    contiguous, on the device) to fill in place. Returns ``{index: (module_idx, tensor)}``, with
    new tensors (cast to the deserializer's dtype) for the rest, and ``{index: requires_grad}``
    (from the stored dtype)."""
    import torch

    d = run.deser
    entries = d._entries
    device = d._device
    direct, casts, fresh = [], [], []
    grads = {}
    for i in indices:
        e = entries[i]
        final, target, grads[i] = _dtypes_of(e, d._dtype)
        dest = into.get(i)
        if dest is not None and dest.dtype == final:
            direct.append((i, dest, dest.data_ptr(), e["nbytes"]))
        elif final == target and dest is None:
            fresh.append((i, final))
        else:
            casts.append((i, e, final, target, dest))
    out = {}
    for (i, t, _, _), idx in _load_fresh(run, direct, fresh):
        out[i] = (idx, t)
    # Casts: load a group at its stored dtype into temporaries, then cast on the GPU.
    group, size = [], 0
    limit = max([CAST_GROUP_BYTES] + [c[1]["nbytes"] for c in casts])
    for n, c in enumerate(casts):
        group.append(c)
        size += c[1]["nbytes"]
        if n + 1 == len(casts) or size + casts[n + 1][1]["nbytes"] > limit:
            tmp = _allocate(entries, [(i, final) for i, _, final, _, _ in group], device)
            idxs = run.native(tmp)
            with torch.no_grad():
                for (i, _e, _f, target, dest), (_, t, _, _), idx in zip(group, tmp, idxs):
                    if dest is not None:
                        dest.copy_(t)
                        out[i] = (idx, dest)
                    else:
                        out[i] = (idx, t.to(target))
            del tmp
            group, size = [], 0
    return out, grads


def _load_fresh(run: _Run, direct: list, fresh: list) -> list:
    """Load ``direct`` jobs plus new tensors for ``fresh`` = ``[(index, dtype)]``; returns
    ``[(job, module_idx)]``."""
    import torch

    d = run.deser
    entries = d._entries
    t0 = time.perf_counter()
    _native.trace_mark("alloc_start", len(fresh))
    total = sum(entries[i]["nbytes"] for i, _ in fresh)
    reserve = total >= RESERVE_MIN_BYTES and _can_reserve(d._device)
    if reserve:
        before = torch.cuda.memory_reserved(d._device)
        _reserve(total + 512 * len(fresh), d._device)  # torch rounds each allocation to 512
    jobs = direct + _allocate(entries, fresh, d._device)
    if reserve and torch.cuda.memory_reserved(d._device) - before > 1.5 * total:
        # The block went unsplit (allocator settings changed at run time): give it back.
        torch.cuda.empty_cache()
    _native.trace_mark("alloc_end", len(fresh))
    run.alloc_seconds.append(time.perf_counter() - t0)
    return list(zip(jobs, run.native(jobs)))


def _can_reserve(device) -> bool:
    """Whether freed memory goes back to torch's own cache, whose large blocks later
    allocations split: not with ``cudaMallocAsync``, ``expandable_segments`` (segments are
    mapped differently) or ``max_split_size_mb`` (larger blocks are never split, so the
    reserved block would sit unused beside the tensors)."""
    import torch

    if device.type != "cuda" or os.environ.get("TENSORIZER_RS_RESERVE") == "0":
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

    if ALLOC_ONE_BLOCK:
        return _allocate_one_block(entries, wanted, device)
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


def _parameters(deser, loaded: tuple[dict, dict], skip=()) -> None:
    """Cache ``_load``'s tensors as Parameters, as CoreWeave returns them (``requires_grad``
    from the stored dtype)."""
    import torch

    # What torch.nn.Parameter(t, requires_grad) does, without its Python-level __new__.
    make, param = torch.Tensor._make_subclass, torch.nn.Parameter
    cache, module_idx = deser._cache, deser._module_idx
    out, grads = loaded
    for i, (idx, t) in out.items():
        module_idx[i] = idx
        if i not in skip:
            cache[i] = make(param, t, grads[i])


def load(deser, indices: list, verify: bool) -> None:
    """The deserializer's ``_load`` for CUDA devices: new tensors for ``indices``."""
    run = _Run(deser, verify)
    with _gc.paused():
        _parameters(deser, _load(run, indices, {}))
    run.done()


def load_into_module(deser, targets: list, rest: list, verify: bool) -> set:
    """Fill ``targets`` = ``[(index, module, attr)]`` in place where the module already holds a
    tensor of the right shape, dtype and device; load the others (and ``rest``, tensors that an
    eager deserializer still owes its cache) into new tensors. Returns the indices filled in
    place; the caller registers the others. Raises on a shape mismatch before reading anything."""
    import torch

    entries = deser._entries
    device = deser._device
    into = {}
    for i, mod, attr in targets:
        e = entries[i]
        table = mod._parameters if e["tensor_type"] == PARAM else mod._buffers
        old = table.get(attr)
        if old is None or old.device.type == "meta":
            continue
        if tuple(old.shape) != tuple(e["shape"]):
            raise TensorizerValueError(
                f"{deser._name}: tensor {e['name']!r}: shape {tuple(e['shape'])} in the file does "
                f"not match {tuple(old.shape)} in the module"
            )
        _, target, _ = _dtypes_of(e, deser._dtype)
        if (
            old.device == device
            and old.dtype == target
            and old.is_contiguous()
            and i not in deser._cache
        ):
            into[i] = old.data if isinstance(old, torch.nn.Parameter) else old
    todo = [i for i, _, _ in targets if i not in deser._cache]
    seen = set(todo)
    todo += [i for i in rest if i not in deser._cache and i not in seen]
    if todo:
        deser._check_open()
    run = _Run(deser, verify)
    with _gc.paused():
        loaded = _load(run, todo, into)
        _parameters(deser, loaded, skip=into)
    for i, mod, attr in targets:
        if i in into:
            table = mod._parameters if entries[i]["tensor_type"] == PARAM else mod._buffers
            deser._cache[i] = table[attr]
    run.done()
    return set(into)


def progress_printer(prefix: str = "tensorizer_rs") -> Callable[[int, float], None]:
    """A ready-made ``progress`` callback that logs bytes done and the rate."""

    def report(done: int, gbps: float) -> None:
        logger.info("%s: %.2f GB loaded, %.2f GB/s", prefix, done / 1e9, gbps)

    return report


def _allocate_one_block(entries: list, wanted: list, device) -> list:
    """`_allocate` with one allocation for all: each tensor a view at a 512-byte aligned
    offset (benchmark A/B, ``ALLOC_ONE_BLOCK``)."""
    import torch

    offsets, end = [], 0
    for i, _ in wanted:
        offsets.append(end)
        end += -(-entries[i]["nbytes"] // 512) * 512
    block = torch.empty(end, dtype=torch.uint8, device=device)
    base = block.data_ptr()
    out = []
    for (i, final), off in zip(wanted, offsets):
        e = entries[i]
        n = e["nbytes"]
        if n == 0:
            t = torch.empty(e["shape"], dtype=final, device=device)
        else:
            t = block[off : off + n].view(final).view(e["shape"])
        out.append((i, t, base + off, n))
    return out
