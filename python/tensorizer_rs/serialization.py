"""``TensorSerializer`` and ``TensorDeserializer`` with CoreWeave tensorizer's names, signatures
and semantics, backed by the Rust core (``tensorizer_rs._native``)."""

from __future__ import annotations

import collections.abc
import contextlib
import enum
import io
import logging
import os
import tempfile
import time
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Union

from . import _dtypes, _gc, _native, stream_io, utils  # noqa: F401 (CoreWeave's names here too)
from .encryption import DecryptionParams, EncryptionParams
from .exceptions import (
    CryptographyError,
    HashMismatchError,
    TensorizerIOError,
    TensorizerKeyError,
    TensorizerNotImplementedError,
    TensorizerTypeError,
    TensorizerUnsupportedError,
    TensorizerValueError,
)

# CoreWeave's serialization.__all__ plus HashMismatchError.
__all__ = [
    "CryptographyError",
    "DecryptionParams",
    "EncryptionParams",
    "FilterFuncType",
    "HashMismatchError",
    "TensorDeserializer",
    "TensorSerializer",
    "TensorType",
]

logger = logging.getLogger("tensorizer_rs")

# CoreWeave's module constants (data versions of the format, magic, opaque dtype separator).
TENSORIZER_VERSION = 5
LONG_TENSOR_TENSORIZER_VERSION = 5
META_TENSOR_TENSORIZER_VERSION = 4
ENCRYPTION_TENSORIZER_VERSION = 3
OPAQUE_TENSORIZER_VERSION = 2
NON_OPAQUE_TENSORIZER_VERSION = 1
TENSORIZER_MAGIC = b"|TZR|"
OPAQUE_DTYPE_SEP = "\0"

# CPUs this process may use (CoreWeave sizes its thread pools from this).
cpu_count: int = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
)


class _SupportsBool(typing.Protocol):
    def __bool__(self) -> bool: ...


# Filter functions take a top-level string key, or a tensor path (a sequence of str/int
# components) for anything else, as in CoreWeave.
FilterFuncType = Callable[[Union[str, Sequence[Union[str, int]]]], _SupportsBool]

# Bytes handed to the native writer per call when sources must be copied to the host first
# (CUDA tensors): bounds host memory while serializing a GPU model.
_WRITE_GROUP_BYTES = 1 << 30
# The same with a `progress` callback, which is called after each call.
_PROGRESS_GROUP_BYTES = 256 << 20


class TensorType(enum.IntEnum):
    PARAM = 0
    BUFFER = 1
    STATE_DICT = 2


class HashType(enum.IntEnum):
    CRC32 = 0
    SHA256 = 1


def _metadata_types() -> dict:
    """CoreWeave's metadata dataclasses, built on first use: importing dataclasses (and the
    inspect module it needs) would add ~20 ms to ``import tensorizer_rs``."""
    import dataclasses

    @dataclasses.dataclass(order=True)
    class TensorHash:
        """One stored hash of a tensor record (CoreWeave's metadata type)."""

        __slots__ = ("hash", "type")
        type: HashType
        hash: bytes

    @dataclasses.dataclass(order=True)
    class TensorEntry:
        """One index entry (CoreWeave's metadata type; ``TensorDeserializer`` does not return it)."""

        __slots__ = (
            "data_length",
            "data_offset",
            "dtype",
            "hashes",
            "header_hashes",
            "metadata_version",
            "name",
            "offset",
            "shape",
            "type",
        )
        metadata_version: int
        name: Any
        type: TensorType
        dtype: str
        shape: tuple[int, ...]
        offset: int
        data_offset: int
        data_length: int
        hashes: list[TensorHash] | None
        header_hashes: dict[HashType, Any] | None

        @property
        def deserialized_length(self):
            if self.data_length > 0:
                return self.data_length
            import numpy

            return numpy.dtype(self.dtype).itemsize * int(numpy.prod(self.shape))

        @property
        def is_long_tensor(self) -> bool:
            return self.metadata_version >= LONG_TENSOR_TENSORIZER_VERSION

    return {"TensorHash": TensorHash, "TensorEntry": TensorEntry}


def __getattr__(name: str):
    if name in ("TensorHash", "TensorEntry"):
        types_ = _metadata_types()
        for k, v in types_.items():
            v.__module__, v.__qualname__ = __name__, k
            globals()[k] = v
        return types_[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), "TensorHash", "TensorEntry"})


Path = Union[str, tuple]


class _DeviceError(TensorizerValueError, RuntimeError):
    """An unusable ``device`` argument. A RuntimeError too, as torch's (what CoreWeave raises)."""


def _import_torch():
    """torch, or a TensorizerError naming the extra that installs it."""
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise TensorizerUnsupportedError(
            "PyTorch is not installed, and tensorizer_rs needs it to make tensors: "
            "pip install 'tensorizer-rs[torch]' (or install torch itself)"
        ) from None
    return torch


def _uri_of(obj: Any) -> str | None:
    """A path or URI we can open natively, for str/PathLike and our own or real file objects."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    uri = getattr(obj, "_tensorizer_uri", None)
    if isinstance(uri, str):
        return uri
    name = getattr(obj, "name", None)
    if isinstance(name, str) and os.path.isfile(name):
        return name
    return None


_UNPINNED_WARNED: set = set()


def _warn_unpinned(f) -> None:
    """Say once per object when loads from it verify hashes whatever ``verify_hash`` says."""
    if not f.pins_version and f.name not in _UNPINNED_WARNED:
        _UNPINNED_WARNED.add(f.name)
        logger.warning(
            "%s: the server sends no strong validator (ETag or Last-Modified), so a change of "
            "the object during a load could not be noticed; verifying the stored hashes of "
            "every tensor read from it",
            f.name,
        )


def _decryption_args(encryption: Any) -> dict:
    from .encryption import DecryptionParams

    if encryption is None:
        return {}
    if not isinstance(encryption, DecryptionParams):
        raise TensorizerTypeError(
            f"encryption must be a DecryptionParams or None, not {type(encryption).__name__}"
        )
    return encryption._native_args()


class TensorDeserializer(collections.abc.Mapping, contextlib.AbstractContextManager):
    """Read a ``.tensors`` file. A read-only Mapping of names to tensors, like CoreWeave's.

    ``file_obj`` may be a path, an ``http(s)://``, ``s3://`` or ``redis://`` URI, or a binary
    file object.
    """

    def __init__(
        self,
        file_obj: Any,
        device: Any = None,
        filter_func: Callable[[Path], bool] | None = None,
        dtype: Any = None,
        *,
        lazy_load: bool = False,
        plaid_mode: bool | None = None,
        plaid_mode_buffers: int | None = None,
        num_readers: int | None = None,
        verify_hash: bool = False,
        encryption: Any = None,
        progress: Callable[[int, float], None] | None = None,
    ) -> None:
        del plaid_mode, plaid_mode_buffers  # accepted for compatibility; no effect (as upstream)
        self._file = None
        self._reopen = None  # (uri, storage) to reopen the file once closed (verify_module)
        self._spilled = False  # read from a private copy of a stream (see _spill)
        self._headers: dict = {}  # hash_info of entries (verify_module; kept from a spilled stream)
        self._deferred = False  # an eager CUDA load waiting for its destinations (see _cuda.py)
        self._progress = progress  # CUDA loads: called with (bytes done, GB/s)
        # CoreWeave's checks: a TypeError for a non-int (a bool is an int), then a ValueError.
        if num_readers is not None and not isinstance(num_readers, int):
            raise TensorizerTypeError(
                "num_readers: expected int or None,"
                f" got {num_readers.__class__.__name__} {num_readers!r}"
            )
        if num_readers is not None and num_readers < 1:
            raise TensorizerValueError(f"num_readers must be positive, got {num_readers!r}")
        num_readers = None if num_readers is None else int(num_readers)
        self._num_readers = num_readers
        self._verify_hash = bool(verify_hash)
        self._crypt = _decryption_args(encryption)
        if dtype is not None and not isinstance(dtype, _import_torch().dtype):
            # A str would reach Tensor.to() and be taken for a device.
            raise TensorizerTypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        self._dtype = dtype
        self._device = self._resolve_device(device)
        uri = _uri_of(file_obj)
        # A local file opens in under a millisecond alone, but in up to 3.5 ms beside the prewarm's
        # page faults, and the readers start that much later: it opens first (the A/B in
        # docs/benchmarks.md). Opening a URL or copying a stream waits on I/O: the prewarm
        # runs beside it.
        opened_first = uri is not None and _native.uri_scheme(uri) in (None, "file")
        if opened_first:
            self._file = self._open(file_obj)
            _native.trace_mark("ctor_opened")
        if self._device.type == "cuda":
            from . import _cuda

            # Page-locking staging buffers overlaps with allocating and building the model.
            _cuda.prewarm_for(self._device, uri, num_readers)
            _native.trace_mark("ctor_prewarm")
        if not opened_first:
            self._file = self._open(file_obj)
            _native.trace_mark("ctor_opened")
        self._file_name = self._file.name  # for messages after the file is closed
        if self._file.encrypted != bool(self._crypt):
            # At construction, lazy loads too, as CoreWeave checks the file's flags (vLLM's
            # is_vllm_tensorized opens lazily and relies on it).
            self._file.close()
            self._file = None
            raise CryptographyError(
                f"{self._file_name}: "
                + (
                    "decryption was requested, but the file is not encrypted"
                    if self._crypt
                    else "the file is encrypted, but no decryption key was given "
                    "(pass encryption=DecryptionParams...)"
                )
            )
        self.total_file_bytes = self._file.total_data_bytes  # the header's field, as in CoreWeave
        _warn_unpinned(self._file)
        self._closed = False
        with _gc.paused():
            self._index(self._file.entries(), filter_func)
        _native.trace_mark("ctor_indexed")
        self._cache: dict[int, Any] = {}
        self._module_idx: dict[int, int] = {}
        self._last_yielded = -1
        # As CoreWeave: the selected tensors' total from the start, whatever has been read;
        # data-less (meta) entries count their full size in a lazy load, nothing in an eager one.
        entries = self._entries
        self.total_tensor_bytes = sum(
            entries[i]["data_length"] or (lazy_load and entries[i]["nbytes"])
            for i in self._selected
        )
        self._total_bytes_read = 0
        self._seconds = 0.0
        self._cuda_stats: list = []
        self._cuda_alloc_seconds: list = []
        if not lazy_load:
            self._last_yielded = len(self._selected) - 1
            if self._device.type == "cuda":
                # Reads wait until the destinations are known: load_into_module fills the
                # module's own tensors; any other access first loads everything (_load).
                self._deferred = True
            else:
                self._load(self._selected)
                self.close()

    def _index(self, entries: list, filter_func) -> None:
        # Plain loops over a list of names: with 20,000 small tensors this is per-tensor cost.
        self._entries = entries
        names = [e["name"] for e in entries]
        if filter_func is None:
            self._selected = list(range(len(names)))
            # As in CoreWeave: a structured name's top-level key is the first component.
            tops = [n[0] if type(n) is tuple else n for n in names]
        else:
            self._selected = [i for i, n in enumerate(names) if filter_func(n)]
            chosen = set(self._selected)
            # Filtered-out leaves disappear, emptied branches stay in keys().
            tops = [
                n[0] if type(n) is tuple else n
                for i, n in enumerate(names)
                if type(n) is tuple or i in chosen
            ]
        self._tree: dict = dict.fromkeys(tops)
        self._keys: list = list(self._tree)
        self._position = {i: n for n, i in enumerate(self._selected)}
        paths = [n if type(n) is tuple else (n,) for n in names]
        self._by_path: dict = {paths[i]: i for i in self._selected}

    # -- construction helpers -------------------------------------------------------------
    @staticmethod
    def _resolve_device(device: Any):
        torch = _import_torch()

        if device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise _DeviceError(f"device={device!r} is not a torch device: {e}") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise TensorizerUnsupportedError(
                    f"device {device!r} requested, but CUDA is not available on this machine"
                )
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            from . import _cuda

            _cuda.check_available(dev)
        return dev

    def _open(self, file_obj: Any):
        if isinstance(file_obj, io.TextIOBase):
            raise TensorizerValueError("file_obj must be opened in binary mode")
        uri = _uri_of(file_obj)
        if uri is not None and _native.uri_scheme(uri) == "redis":
            from .stream_io import RedisStreamFile

            with RedisStreamFile(uri) as stream:
                return self._spill(stream.read, uri)
        if uri is not None:
            storage = getattr(file_obj, "_tensorizer_storage", None)
            f = _native.TensorFile(uri, storage)
            self._reopen = (uri, storage)
            return f
        if isinstance(file_obj, (bytes, bytearray, memoryview)):
            raise TensorizerTypeError(
                "file_obj must be a path, URI or binary file object, not bytes"
            )
        read = getattr(file_obj, "read", None)
        if read is None:
            raise TensorizerTypeError(f"cannot read tensors from {type(file_obj).__name__}")
        name = getattr(file_obj, "name", None)
        return self._spill(read, name if isinstance(name, str) else f"<{type(file_obj).__name__}>")

    def _spill(self, read: Callable[[int], bytes], name: str):
        """Streams without a path (BytesIO, pipes, Redis): copy to a private temp file and read
        that natively; messages name the stream."""
        where = tempfile.gettempdir()
        try:
            fd, tmp = tempfile.mkstemp(prefix="tensorizer-rs-", suffix=".tensors")
        except OSError as e:
            raise TensorizerIOError(f"cannot make a temporary file in {where}: {e}") from e
        try:
            try:
                with os.fdopen(fd, "wb") as out:
                    while True:
                        chunk = read(16 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
            except OSError as e:
                raise TensorizerIOError(
                    f"cannot spill the stream to a temporary file in {where} (is it full?): {e}"
                ) from e
            f = _native.TensorFile(tmp, None, name)
            self._spilled = True
            return f
        finally:
            os.unlink(tmp)

    # -- loading ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._file is None:
            raise TensorizerValueError(
                "the TensorDeserializer is closed and this tensor was not loaded"
            )

    def _load(self, indices: list, verify_hash: bool | None = None) -> None:
        todo = [i for i in indices if i not in self._cache]
        if not todo:
            return
        deferred, self._deferred = self._deferred, False
        if deferred:
            todo = [i for i in self._selected if i not in self._cache]
        self._check_open()
        start = time.perf_counter()
        verify = self._verify_hash if verify_hash is None else bool(verify_hash)
        if self._device.type == "cuda":
            from . import _cuda

            self._take(_cuda.load(self._cuda_request(), todo, verify))
            if deferred:
                self.close()
            return
        loaded = self._file.load(
            todo, num_readers=self._num_readers, verify_hash=verify, **self._crypt
        )
        with _gc.paused():
            for i, (module_idx, host) in zip(todo, loaded):
                self._module_idx[i] = module_idx
                self._cache[i] = self._to_tensor(i, host)
                self.total_bytes_read += self._entries[i]["data_length"]
        self._seconds += time.perf_counter() - start

    def _cuda_request(self):
        """What the CUDA path (``_cuda``) needs from this deserializer."""
        from . import _cuda

        return _cuda.Request(
            file=self._file,
            name=self._name,
            entries=self._entries,
            device=self._device,
            dtype=self._dtype,
            num_readers=self._num_readers,
            crypt=self._crypt,
            progress=self._progress,
        )

    def _take(self, loaded) -> None:
        """File a CUDA load's result (``_cuda.Loaded``): its new tensors into the cache, its
        module indices and byte counts."""
        self._cache.update(loaded.tensors)
        self._module_idx.update(loaded.module_idx)
        self.total_bytes_read += loaded.bytes
        self._seconds += loaded.seconds
        self._cuda_stats = loaded.stats
        self._cuda_alloc_seconds = loaded.alloc_seconds

    def fills_in_place(self, name: str, tensor: Any) -> bool:
        """Whether :meth:`load_into_module` would write the file's tensor ``name`` into
        ``tensor`` itself rather than replace it (a tensorizer-rs extension: only loads to a
        CUDA device fill in place, where device, shape, dtype after ``dtype=`` and contiguity
        match). The vLLM loader frees the tensors that will be replaced before it loads."""
        if self._device.type != "cuda":
            return False
        from . import _cuda

        i = self._by_path.get((name,))
        return i is not None and _cuda.fits_in_place(
            self._entries[i], tensor, self._device, self._dtype
        )

    def _stored_tensor(self, i: int, host: Any):
        """Tensor ``i``'s loaded bytes as a CPU tensor of its stored dtype (no ``dtype=`` cast)."""
        import torch

        e = self._entries[i]
        try:
            base, final = _dtypes.resolve_torch(e["container"], e["torch_dtype"])
        except TypeError as exc:
            raise TensorizerValueError(f"{self._file.name}: tensor {e['name']!r}: {exc}") from None
        t = torch.from_dlpack(host)
        if t.dtype != base:
            t = t.view(base)
        if final != base:
            t = t.view(final)
        return t

    def _to_tensor(self, i: int, host: Any):
        import torch

        t = self._stored_tensor(i, host)
        final = t.dtype
        requires_grad = final.is_floating_point or final.is_complex
        target = self._dtype
        # CoreWeave casts everything but bool; complex -> real is skipped (upstream PR #207).
        if (
            target is not None
            and final not in (target, torch.bool)
            and not (final.is_complex and not target.is_complex)
        ):
            t = t.to(target)
        if self._device.type != "cpu":
            t = t.to(self._device)
        return torch.nn.Parameter(t, requires_grad=requires_grad)

    def _index_of(self, key: Any) -> int:
        path = key if isinstance(key, tuple) else (key,)
        i = self._by_path.get(path)
        if i is None:
            raise TensorizerKeyError(f"Tensor {key} not found")
        return i

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: Any):
        path = name if isinstance(name, tuple) else (name,)
        i = self._by_path.get(path)
        if i is not None:
            self._load([i])
            return self._cache[i]
        sub = [j for p, j in self._by_path.items() if p[: len(path)] == path and len(p) > len(path)]
        if not sub and name not in self._tree:
            raise TensorizerKeyError(f"Tensor {name} not found")
        self._load(sorted(sub, key=self._position.__getitem__))
        return self._subtree(path)

    def _subtree(self, prefix: tuple):
        """The tensors under ``prefix`` as nested read-only mappings. One pass over the paths,
        each walked once, no recursion: a path of 32,000 components costs 32,000 steps."""
        out: dict = {}
        depth = len(prefix)
        for p, j in self._by_path.items():
            if len(p) <= depth or p[:depth] != prefix:
                continue
            node = out
            for k in p[depth:-1]:
                child = node.get(k)
                if child is None:
                    child = node[k] = {}
                node = child
            node[p[-1]] = self._cache[j]
        # A mapping proxy is a live view of its dict, so wrapping top-down is enough.
        stack = [out]
        while stack:
            node = stack.pop()
            for k, v in node.items():
                if type(v) is dict:
                    node[k] = types.MappingProxyType(v)
                    stack.append(v)
        return types.MappingProxyType(out)

    def __iter__(self) -> Iterator:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._tree

    def keys(self):
        """The top-level keys (a ``dict_keys``, as in CoreWeave)."""
        return self._tree.keys()

    def tree(
        self,
        prefix: Any | None = None,
        *,
        default: Any = None,
        filter_func: FilterFuncType | None = None,
    ):
        """The subtree under ``prefix`` (a sequence of keys; ``None`` or ``()`` for the root) as
        real dicts and lists (lists for int-keyed levels), the tensor itself when ``prefix``
        names one, or ``default`` when no tensor matches. ``filter_func`` gets each tensor's full
        name (a str for top-level string keys, else a tuple)."""
        if prefix is None:
            prefix = ()
        if isinstance(prefix, (str, int)):
            raise TypeError(
                "Invalid prefix: expected sequence,"
                f" got {prefix.__class__.__name__!r}"
                " (for a single-element prefix, use a single-element sequence)"
            )
        prefix = tuple(prefix)
        chosen = [
            j
            for p, j in self._by_path.items()
            if p[: len(prefix)] == prefix
            and (filter_func is None or filter_func(self._entries[j]["name"]))
        ]
        if not chosen:
            return default
        self._load(sorted(chosen, key=self._position.__getitem__))
        if len(chosen) == 1 and len(self._path_of(chosen[0])) == len(prefix):
            return self._cache[chosen[0]]  # the prefix names a tensor
        root: dict = {}
        for j in chosen:
            p = self._path_of(j)[len(prefix) :]
            node = root
            for k in p[:-1]:
                node = node.setdefault(k, {})
            node[p[-1]] = self._cache[j]
        return _lists_for_int_levels(root)

    def _path_of(self, i: int) -> tuple:
        name = self._entries[i]["name"]
        return name if isinstance(name, tuple) else (name,)

    # -- CoreWeave's iteration APIs --------------------------------------------------------
    def _pending(self, filter_func, num_tensors: int) -> list:
        """The selected tensors after the last one yielded that pass ``filter_func``, at most
        ``num_tensors`` of them (all for -1)."""
        if num_tensors < -1:
            raise TensorizerValueError("num_tensors must be -1 or non-negative")  # as CoreWeave
        pending = [
            i
            for i in self._selected[self._last_yielded + 1 :]
            if filter_func is None or filter_func(self._entries[i]["name"])
        ]
        return pending if num_tensors == -1 else pending[:num_tensors]

    def read_tensors(self, filter_func=None, num_tensors: int = -1, verify_hash=None):
        """Yield ``(module_idx, tensor_type, name, tensor)`` in file order, resuming after the
        last tensor yielded."""
        for i, t in self._read_cached(filter_func, num_tensors, verify_hash):
            e = self._entries[i]
            yield self._module_idx[i], TensorType(e["tensor_type"]), e["name"], t

    def _read_cached(self, filter_func, num_tensors: int, verify_hash):
        """Yield ``(index, tensor)`` for read_tensors: load the pending tensors into the cache."""
        pending = self._pending(filter_func, num_tensors)
        self._load(pending, verify_hash)
        for i in pending:
            self._last_yielded = max(self._last_yielded, self._position[i])
            yield i, self._cache[i]

    def read_numpy_arrays(
        self,
        filter_func=None,
        num_tensors: int = -1,
        allow_raw_data: bool = False,
        verify_hash=None,
    ):
        """Yield ``(module_idx, tensor_type, name, ndarray, is_opaque, torch_dtype|None)``.
        The arrays hold the stored data: the constructor's ``dtype=`` does not apply (as in
        CoreWeave)."""
        import numpy as np

        if self._device.type != "cpu":
            raise _DeviceError("read_numpy_arrays works only with device='cpu'")
        # Without dtype= the cached tensors are the stored data.
        read = self._read_cached if self._dtype is None else self._read_stored
        stored = read(filter_func, num_tensors, verify_hash)
        for i, t in stored:
            e = self._entries[i]
            name = e["name"]
            opaque = e["torch_dtype"] is not None
            if opaque and not allow_raw_data:
                raise TensorizerValueError(
                    f"tensor {name!r} has dtype torch.{e['torch_dtype']}, which numpy cannot represent; "
                    "pass allow_raw_data=True to get its raw bits"
                )
            arr = t.detach()
            if opaque:
                import torch

                arr = arr.view(getattr(torch, _dtypes.CONTAINER_TO_TORCH[e["container"]]))
            yield (
                self._module_idx[i],
                TensorType(e["tensor_type"]),
                name,
                np.asarray(arr.numpy()),
                opaque,
                (f"torch.{e['torch_dtype']}" if opaque else None),
            )

    def _read_stored(self, filter_func, num_tensors: int, verify_hash):
        """Yield ``(index, tensor)`` like read_tensors, but each tensor in its stored dtype:
        the cache holds them cast to ``dtype=``, so these are read again and not cached."""
        pending = self._pending(filter_func, num_tensors)
        if not pending:
            return
        self._check_open()
        verify = self._verify_hash if verify_hash is None else bool(verify_hash)
        loaded = self._file.load(
            pending, num_readers=self._num_readers, verify_hash=verify, **self._crypt
        )
        for i, (module_idx, host) in zip(pending, loaded):
            self._module_idx[i] = module_idx
            self.total_bytes_read += self._entries[i]["data_length"]
            self._last_yielded = max(self._last_yielded, self._position[i])
            yield i, self._stored_tensor(i, host)

    def load_into_module(self, m, filter_func=None, verify_hash=None) -> int:
        """Put every selected PARAM/BUFFER tensor into module ``m`` (names like ``layer.weight``;
        ``.x`` is the root module). Existing tensors of the same shape are replaced in place,
        keeping their Parameter objects and attributes. Returns the count and closes the file."""
        import torch

        chosen = []
        for i in self._selected:
            e = self._entries[i]
            if filter_func is not None and not filter_func(e["name"]):
                continue
            if e["tensor_type"] == TensorType.STATE_DICT or isinstance(e["name"], tuple):
                raise TensorizerNotImplementedError(
                    f"tensor {e['name']!r} is a state-dict entry; load_into_module needs write_module files"
                )
            chosen.append(i)
        modules = dict(m.named_modules())
        targets = []
        for i in chosen:
            name = self._entries[i]["name"]
            prefix, _, attr = name.rpartition(".")
            if prefix not in modules:
                raise TensorizerKeyError(
                    f"{self._name}: tensor {name!r}: module {prefix!r} not found in the model"
                )
            targets.append((i, modules[prefix], attr))
        if self._device.type == "cuda":
            from . import _cuda

            rest, self._deferred = (self._selected if self._deferred else []), False
            verify = self._verify_hash if verify_hash is None else bool(verify_hash)
            if any(i not in self._cache for i in chosen + rest):
                self._check_open()
            loaded = _cuda.load_into_module(
                self._cuda_request(), targets, rest, verify, cached=self._cache
            )
            self._take(loaded)
            with torch.no_grad():
                for i, mod, attr in targets:
                    if i in loaded.in_place:
                        # The module's own tensor holds the data: it is the cached one.
                        param = self._entries[i]["tensor_type"] == TensorType.PARAM
                        self._cache[i] = (mod._parameters if param else mod._buffers)[attr]
                    else:
                        self._place(mod, attr, i)
            self.close()
            return len(targets)
        self._load(chosen, verify_hash)
        with torch.no_grad():
            for i, mod, attr in targets:
                self._place(mod, attr, i)
        self.close()
        return len(targets)

    @property
    def _name(self) -> str:
        return self._file_name

    def _place(self, mod, attr: str, i: int) -> None:
        import torch

        e = self._entries[i]
        t = self._cache[i]
        if e["tensor_type"] == TensorType.PARAM:
            old = mod._parameters.get(attr)
            if old is not None and old.device.type != "meta" and tuple(old.shape) != tuple(t.shape):
                raise TensorizerValueError(
                    f"tensor {e['name']!r}: shape {tuple(t.shape)} in the file does not match "
                    f"{tuple(old.shape)} in the module"
                )
            if old is not None and isinstance(old, torch.nn.Parameter):
                new = torch.nn.Parameter(t.detach(), requires_grad=old.requires_grad)
                new.__dict__.update(old.__dict__)  # keep attributes such as vLLM's weight_loader
                mod._parameters[attr] = new
            else:
                mod.register_parameter(attr, t)
        else:
            if attr in mod._buffers:
                mod._buffers[attr] = t.detach()
            else:
                mod.register_buffer(attr, t.detach())

    # -- verification and export ------------------------------------------------------------
    @contextlib.contextmanager
    def _opened(self, what: str):
        """The native file: ours while open, else the file reopened by its path or URI."""
        if self._file is not None:
            yield self._file
            return
        if self._reopen is None:
            raise TensorizerValueError(
                f"{what}: the TensorDeserializer is closed and was read from a stream, which "
                "cannot be reopened; use lazy_load=True, or pass a path or URI"
            )
        f = _native.TensorFile(*self._reopen)
        try:
            yield f
        finally:
            f.close()

    def _hash_infos(self, indices: list) -> dict:
        """(hashable header, {kind: digest}) per entry, read once."""
        todo = [i for i in indices if i not in self._headers]
        if todo:
            with self._opened("verify_module") as f, _gc.paused():
                self._headers.update(zip(todo, f.hash_info(todo)))
        return {i: self._headers[i] for i in indices}

    def verify_module(self, m) -> tuple[bool, list[tuple[str, bool]]]:
        """Check each selected tensor's stored hashes against the tensor of the same name in
        ``m`` (``m.state_dict()`` plus its buffers). Returns ``(all passed, [(name, passed)])``
        in file order, then the top-level keys ``m`` lacks (as in CoreWeave).

        Unlike tensorizer 2.12.1 (docs/format.md): root-level tensors (``.x``) are compared with
        the module's ``x``; a name is listed once; the tensors need not be loaded first."""
        modules = dict(m.state_dict())
        # Non-persistent buffers are serialized too, but are not in a state_dict().
        modules.update(m.named_buffers())

        def module_key(name):
            return name[1:] if isinstance(name, str) and name.startswith(".") else name

        headers = self._hash_infos(self._selected)
        results: list[tuple[Any, bool]] = []
        for i in self._selected:
            e = self._entries[i]
            t = modules.get(module_key(e["name"]))
            results.append((e["name"], t is not None and _hashes_match(e, headers[i], t)))
        reported = {name for name, _ in results}
        for k in self._keys:
            if module_key(k) not in modules and k not in reported:
                results.append((k, False))
        return all(ok for _, ok in results), results

    def to_redis(self, redis_client: Any, key_prefix: str, force: bool = False) -> None:
        """Store the file in Redis as CoreWeave does: ``{key_prefix}:header:0`` holds the file
        header and index, ``{key_prefix}:{name}:{offset}`` each record's header and data (at
        their file offsets), so ``redis://host:port/{key_prefix}`` reads back as the file.
        Records whose header key exists are skipped unless ``force``."""
        with self._opened("to_redis") as f:
            raw = f.read_at(0, 73 + f.index_len)
            if len(raw) < 73 or raw[:5] != TENSORIZER_MAGIC:
                raise TensorizerValueError(f"{f.name}: cannot export a truncated header to Redis")
            # CoreWeave re-encodes the header: flags only from data version 4, reserved zeroed.
            version = int.from_bytes(raw[5:9], "little")
            flags = raw[9:41] if version >= META_TENSOR_TENSORIZER_VERSION else bytes(32)
            header = raw[:9] + flags + raw[41:49] + bytes(8) + raw[57:]
            redis_client.set(f"{key_prefix}:header:0", header)
            for i in self._selected:
                e = self._entries[i]
                name = e["name_bytes"].decode("utf-8")
                offset, data_offset = e["header_offset"], e["data_offset"]
                if not force and redis_client.exists(f"{key_prefix}:{name}:{offset}"):
                    continue
                redis_client.set(
                    f"{key_prefix}:{name}:{offset}", f.read_at(offset, data_offset - offset)
                )
                redis_client.set(
                    f"{key_prefix}:{name}:{data_offset}", f.read_at(data_offset, e["data_length"])
                )

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        if self._deferred and self._file is not None:
            self._load(self._selected)  # an eager load owes its tensors before the file goes
        if self._file is not None:
            if self._spilled:
                # A private copy cannot be reopened later: keep what verify_module needs.
                with contextlib.suppress(Exception):
                    self._hash_infos(self._selected)
            self._file.close()
            self._file = None

    def __exit__(self, exc_type, exc_val, traceback) -> None:
        self.close()

    def __del__(self) -> None:
        # No module globals (contextlib): at interpreter exit they may already be None.
        try:
            self._deferred = False
            self.close()
        except Exception:  # noqa: BLE001, S110 - a finalizer has nobody to report to
            pass

    @property
    def total_bytes_read(self) -> int:
        """Tensor data bytes read so far."""
        return self._total_bytes_read

    @total_bytes_read.setter
    def total_bytes_read(self, value: int) -> None:
        self._total_bytes_read = value

    @property
    def read_bytes(self) -> int:
        return self.total_bytes_read

    @property
    def cuda_load_stats(self) -> dict:
        """What this deserializer's last load to a CUDA device did (a tensorizer-rs extension,
        for benchmarks): ``{"loads": [...], "alloc_seconds": [...]}``, one dict per native load
        (``seconds``, ``readers``, ``staged_bytes``, ``staging_chunk``, ``staging_buffers``,
        ``decrypted_on_device``, ``host_decrypt``: why an encrypted load decrypted on the host,
        else ``None``, ...) and the time each allocation of new tensors took; both empty before
        such a load."""
        return {"loads": list(self._cuda_stats), "alloc_seconds": list(self._cuda_alloc_seconds)}

    @property
    def cache_status(self) -> str | None:
        """CoreWeave reports a caching proxy's ``x-cache-status`` header here; response headers
        are not kept, so this is always ``None``."""
        return None


def _hashes_match(entry: dict, header: dict, tensor: Any) -> bool:
    """Whether ``tensor``'s bytes hash to what the record stores (CRC32 and/or SHA-256 over
    the hashable header, then the data). A record without hashes passes, as in CoreWeave."""
    import hashlib
    import zlib

    import torch

    if entry["data_length"] == 0:
        data = b""  # a meta (zero-filled) record hashes no data
    else:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return False
        t = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy()
    hashable, hashes = header
    for kind, stored in hashes.items():
        if kind == "crc32":
            if zlib.crc32(data, zlib.crc32(hashable)).to_bytes(4, "little") != stored:
                return False
        else:
            sha = hashlib.sha256(hashable)
            sha.update(data)
            if sha.digest() != stored:
                return False
    return True


def _lists_for_int_levels(root: dict):
    """``tree()``'s result: nested dicts, with lists for levels whose keys are all ints.
    Built top-down with an explicit stack, so any nesting depth works."""
    holder: list = [None]
    stack = [(holder, 0, root)]
    while stack:
        parent, key, node = stack.pop()
        if type(node) is not dict:
            parent[key] = node
            continue
        if node and all(type(k) is int for k in node):
            keys = sorted(node)
            new: Any = [None] * len(keys)
            stack.extend((new, n, node[k]) for n, k in enumerate(keys))
        else:
            new = dict.fromkeys(node)
            stack.extend((new, k, v) for k, v in node.items())
        parent[key] = new
    return holder[0]


# --------------------------------------------------------------------------------------------
class _Item:
    __slots__ = ("module_idx", "name", "tensor", "ttype")

    def __init__(self, module_idx, ttype, name, tensor):
        self.module_idx, self.ttype, self.name, self.tensor = module_idx, ttype, name, tensor


def _encode_path(path: tuple) -> bytes:
    import json

    if len(path) == 1 and isinstance(path[0], str):
        return path[0].encode("utf-8")
    return b"\x1e" + json.dumps(list(path), separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def _state_dict_items(state_dict: Any) -> list:
    """The leaves of a nested state dict in order, as STATE_DICT items named by their paths.
    An explicit stack instead of recursion: any nesting depth works, in time linear in the
    size of the paths."""
    items: list = []
    path: list = []
    stack = [iter(((None, state_dict),))]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            if path:
                path.pop()
            continue
        key, obj = step
        if key is not None:
            path.append(key)
        if isinstance(obj, collections.abc.Mapping):
            for k in obj:
                if not isinstance(k, str):
                    raise TensorizerTypeError(
                        f"state dict keys must be str, got {type(k).__name__} {k!r}"
                    )
            stack.append(iter(list(obj.items())))
            continue
        if isinstance(obj, (list, tuple)):
            stack.append(iter(list(enumerate(obj))))
            continue
        if not path:
            raise TensorizerTypeError("write_state_dict needs a dict, list or tuple")
        items.append(_Item(0, TensorType.STATE_DICT, tuple(path), obj))
        path.pop()
    return items


class TensorSerializer:
    """Write a ``.tensors`` file that CoreWeave's tensorizer (2.10.1+) can read.

    The file appears at its destination only when :meth:`close` succeeds; a failed or
    abandoned write leaves nothing behind.
    """

    def __init__(
        self,
        file_obj: Any,
        compress_tensors: bool = False,
        *,
        encryption: Any = None,
        limit_cpu_concurrency: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """``progress`` (ours, not CoreWeave's): called with the tensor bytes written so far."""
        from .encryption import EncryptionParams

        del compress_tensors  # accepted, does nothing (as upstream)
        self._writer = None
        if encryption is not None and not isinstance(encryption, EncryptionParams):
            raise TensorizerTypeError(
                f"encryption must be an EncryptionParams or None, not {type(encryption).__name__}"
            )
        if limit_cpu_concurrency is not None and (
            not isinstance(limit_cpu_concurrency, int) or limit_cpu_concurrency < 1
        ):
            raise TensorizerValueError("limit_cpu_concurrency must be an int >= 1 or None")
        self._threads = limit_cpu_concurrency
        self._progress = progress
        self._written = 0
        self._file_obj = None
        if isinstance(file_obj, io.TextIOBase):
            raise TensorizerValueError("file_obj must be opened in binary mode")
        uri = _uri_of(file_obj)
        scheme = _native.uri_scheme(uri) if uri is not None else None
        if scheme in ("http", "https", "redis"):
            # Read-only schemes, refused as CoreWeave's open_stream(file_obj, "wb+") does.
            kind = "redis" if scheme == "redis" else "http(s)"
            raise TensorizerValueError(
                f'{uri}: Only the mode "rb" is valid when opening {kind}:// streams.'
            )
        if uri is None:
            if not hasattr(file_obj, "write"):
                raise TensorizerTypeError(f"cannot write tensors to {type(file_obj).__name__}")
            if hasattr(file_obj, "seekable") and not file_obj.seekable():
                raise TensorizerValueError("file_obj must be seekable")
            # A nameless stream (BytesIO): build the file privately, copy it in at close.
            self._file_obj = file_obj
            try:
                fd, uri = tempfile.mkstemp(prefix="tensorizer-rs-", suffix=".tensors")
            except OSError as e:
                raise TensorizerIOError(
                    f"cannot make a temporary file in {tempfile.gettempdir()}: {e}"
                ) from e
            os.close(fd)
            os.unlink(uri)
            self._spill = uri
        else:
            self._spill = None
            if not isinstance(file_obj, (str, os.PathLike)):
                self._file_obj = file_obj  # closed at close(), as CoreWeave does
        kw = encryption._native_args() if encryption is not None else {}
        claim = getattr(file_obj, "_claim", None)
        if claim is not None:
            claim()  # our own S3 stream: we stream the object ourselves
        self._writer = _native.TensorWriter(
            uri, storage=getattr(file_obj, "_tensorizer_storage", None), **kw
        )

    @property
    def total_tensor_bytes(self) -> int:
        return self._writer.total_tensor_bytes if self._writer is not None else self._total

    # -- public API ------------------------------------------------------------------------
    def write_tensor(self, idx: int, name: str, tensor_type: Any, tensor: Any) -> None:
        with self._aborting():
            if not isinstance(name, str):
                raise TensorizerTypeError(f"tensor name must be a str, not {type(name).__name__}")
            items = [_Item(int(idx), TensorType(tensor_type), (name,), tensor)]
        self._write(items)

    def write_module(
        self, m, remove_tensors: bool = False, *, include_non_persistent_buffers: bool = True
    ) -> None:
        """Write every parameter and buffer of ``m`` under CoreWeave's names (``.x`` for the
        root module). Unlike tensorizer 2.12.1, ``include_non_persistent_buffers=False`` drops
        only non-persistent buffers (upstream also drops persistent root-level buffers)."""
        items = []
        owners = []
        with self._aborting():
            for idx, (mname, mod) in enumerate(m.named_modules()):
                for pname, p in mod.named_parameters(recurse=False):
                    items.append(_Item(idx, TensorType.PARAM, (f"{mname}.{pname}",), p))
                    owners.append((mod, pname, "_parameters"))
                skip = getattr(mod, "_non_persistent_buffers_set", set())
                for bname, b in mod.named_buffers(recurse=False):
                    if not include_non_persistent_buffers and bname in skip:
                        continue
                    items.append(_Item(idx, TensorType.BUFFER, (f"{mname}.{bname}",), b))
                    owners.append((mod, bname, "_buffers"))
        self._write(items)
        if remove_tensors:
            for mod, attr, where in owners:
                getattr(mod, where)[attr] = None

    def write_state_dict(self, state_dict: Any) -> None:
        with self._aborting():
            items = _state_dict_items(state_dict)
        self._write(items)

    # -- machinery -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _aborting(self):
        """Abort the writer on any failure: a write_* call that raised must not let a later
        close() commit a partial file over the destination."""
        try:
            yield
        except BaseException:
            self._abort()
            raise

    def _describe(self, item: _Item):
        """(stored dtype, shape, meta, materialize-zeros) for one source tensor or array."""
        import numpy as np

        t = item.tensor
        if isinstance(t, np.ndarray):
            if t.dtype.kind not in "biufc" or t.dtype.byteorder == ">":
                raise TensorizerTypeError(
                    f"tensor {item.name!r}: numpy dtype {t.dtype} cannot be serialized"
                )
            return t.dtype.str, tuple(t.shape), False
        torch = _import_torch()

        if not isinstance(t, torch.Tensor):
            raise TensorizerTypeError(
                f"tensor {item.name!r}: expected a torch.Tensor or numpy array, got {type(t).__name__}"
            )
        itemsize = t.element_size()
        stored = _dtypes.stored_string(t.dtype, itemsize)
        meta = t.device.type == "meta"
        opaque = "\0" in stored
        if opaque and t.numel() == 0:
            # CoreWeave's reader cannot open empty tensors of opaque dtypes (numpy can't size
            # them); store the same-width int container instead (docs/format.md).
            stored = _dtypes.container_string(t.dtype, itemsize)
        elif meta and (opaque or t.dim() == 0):
            # CoreWeave's reader cannot size data-less entries of opaque dtypes, nor 0-dim ones
            # (numpy.prod(()) is a float): store real zeros for those meta tensors instead.
            meta = False
        return stored, tuple(t.shape), meta

    @staticmethod
    def _host_bytes(item: _Item, stored: str, meta: bool):
        """A C-contiguous host object holding the bytes, and its (address, length)."""
        import numpy as np

        t = item.tensor
        if meta:
            return None, 0, 0
        if isinstance(t, np.ndarray):
            a = np.ascontiguousarray(t)
            return a, a.ctypes.data, a.nbytes
        import torch

        t = t.detach()
        if t.device.type == "meta":
            t = torch.zeros(t.shape, dtype=t.dtype)
        elif t.device.type != "cpu":
            t = t.to("cpu")
        t = t.resolve_conj().resolve_neg().contiguous()
        return t, t.data_ptr(), t.numel() * t.element_size()

    def _write(self, items: list) -> None:
        if self._writer is None:
            raise TensorizerValueError("the TensorSerializer is closed")
        with self._aborting():
            described = [self._describe(it) for it in items]
            first = self._writer.add(
                [
                    (
                        it.module_idx,
                        int(it.ttype),
                        _encode_path(it.name),
                        stored.encode("ascii"),
                        list(shape),
                        meta,
                    )
                    for it, (stored, shape, meta) in zip(items, described)
                ]
            )
            group, keep, size = [], [], 0
            limit = _WRITE_GROUP_BYTES if self._progress is None else _PROGRESS_GROUP_BYTES
            for n, (it, (stored, _, meta)) in enumerate(zip(items, described)):
                obj, addr, length = self._host_bytes(it, stored, meta)
                keep.append(obj)
                group.append((first + n, addr, length))
                size += length
                if size >= limit:
                    self._write_group(group, size)
                    group, keep, size = [], [], 0
            if group:
                self._write_group(group, size)

    def _write_group(self, group: list, size: int) -> None:
        self._writer.write_many(group, self._threads)
        if self._progress is not None:
            self._written += size
            self._progress(self._written)

    def _abort(self) -> None:
        if self._writer is not None:
            self._total = self._writer.total_tensor_bytes
            self._writer.abort()
            self._writer = None
        if self._spill and os.path.exists(self._spill):
            os.unlink(self._spill)

    def close(self) -> None:
        if self._writer is None:
            return
        self._total = self._writer.total_tensor_bytes
        try:
            self._writer.finish()
        finally:
            self._writer = None
        if self._file_obj is not None:
            if self._spill:
                with open(self._spill, "rb") as src:
                    self._file_obj.seek(0)
                    while True:
                        chunk = src.read(16 << 20)
                        if not chunk:
                            break
                        self._file_obj.write(chunk)
                os.unlink(self._spill)
            self._file_obj.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def __del__(self) -> None:
        # No module globals (contextlib): at interpreter exit they may already be None.
        try:
            self._abort()
        except Exception:  # noqa: BLE001, S110 - a finalizer has nobody to report to
            pass
