"""``torch.save`` / ``torch.load`` with tensor data in a ``.tensors`` sidecar, as CoreWeave's
``tensorizer.torch_compat``:

    with tensorizer_saving():
        torch.save(module, "module.pt")        # writes module.pt and module.pt.tensors
    with tensorizer_loading(device="cpu", num_readers=4):
        module = torch.load("module.pt")

Inside ``tensorizer_saving``, ``torch.save`` pickles every storage that holds data as the
persistent id ``("TensorizerPickler", 0, "storage", index, dtype)`` and writes the storages, as
flat ``uint8`` tensors, with ``TensorSerializer.write_state_dict`` (a list, in index order).
``tensorizer_loading`` reverses it. The ids and the sidecar layout are CoreWeave's, so either
library reads what the other wrote. Other threads and coroutines are unaffected (context
variables); ``torch.save`` / ``torch.load`` are patched only while some context is active.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import threading
import types
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, Callable

from .serialization import TensorDeserializer, TensorSerializer

__all__ = (
    "tensorizer_loading",
    "tensorizer_saving",
)

logger = logging.getLogger(__name__)

_PID_TAG = "TensorizerPickler"
_PID_VERSION = 0

# Where the sidecar goes / comes from (a TensorSerializer / TensorDeserializer file_obj, or a
# callable mapping torch's `f` to one), and the keyword arguments for them.
_saving_target: ContextVar[Any] = ContextVar("_tensorizer_saving_filename", default=None)
_loading_target: ContextVar[Any] = ContextVar("_tensorizer_loading_filename", default=None)
_serializer_kwargs: ContextVar[dict | None] = ContextVar(
    "_tensorizer_serializer_kwargs", default=None
)
_deserializer_kwargs: ContextVar[dict | None] = ContextVar(
    "_tensorizer_deserializer_kwargs", default=None
)
_save_func: ContextVar[Callable | None] = ContextVar("_save_wrapper_save_func", default=None)
_load_func: ContextVar[Callable | None] = ContextVar("_load_wrapper_load_func", default=None)
_saving_active: ContextVar[bool] = ContextVar("_save_wrapper_active", default=False)
_loading_active: ContextVar[bool] = ContextVar("_load_wrapper_active", default=False)
_suppress_weights_only: ContextVar[bool] = ContextVar("_suppress_weights_only", default=False)


def _storage_has_data(storage) -> bool:
    untyped = getattr(storage, "_untyped_storage", storage)
    return untyped.device.type != "meta" and untyped.data_ptr() != 0


def _storage_as_tensor(storage):
    """A flat uint8 tensor over all of ``storage``'s bytes (what TensorSerializer writes)."""
    import torch

    if not isinstance(storage, torch.UntypedStorage):
        untyped = getattr(storage, "_untyped_storage", None)
        storage = untyped if untyped is not None else storage.untyped()
    tensor = torch.empty((0,), dtype=torch.uint8, device=storage.device)
    tensor.set_(storage)
    return tensor


@functools.cache
def _pickle_module() -> types.ModuleType:
    """The ``pickle_module`` torch.save / torch.load get inside the contexts, made on first use
    (so importing the package does not import pickle)."""
    import inspect
    import pickle

    class _TensorizerPickler(pickle.Pickler):
        """Pickles storages with data as references into the sidecar, which ``dump`` writes."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__target = _saving_target.get()
            self.__tensors: list = []
            self.__ids: dict = {}

        def persistent_id(self, obj):
            import torch

            if self.__target is None or not torch.is_storage(obj) or not _storage_has_data(obj):
                return None
            tensor = _storage_as_tensor(obj)
            # One sidecar entry per distinct storage view (the same storage pickled twice).
            key = (tensor.data_ptr(), tensor.dtype, tensor.shape, tensor.layout, tensor.stride())
            idx = self.__ids.setdefault(key, len(self.__tensors))
            if idx == len(self.__tensors):
                self.__tensors.append(tensor)
            else:
                self.__tensors[idx] = tensor
            return _PID_TAG, _PID_VERSION, "storage", idx, getattr(obj, "dtype", None)

        def dump(self, obj):
            super().dump(obj)
            tensors, self.__tensors, self.__ids = self.__tensors, [], {}
            if not tensors or self.__target is None:
                return
            kwargs = _serializer_kwargs.get() or {}
            save_func = _save_func.get()
            if save_func is not None:
                save_func(self.__target, tensors, kwargs)
                return
            serializer = TensorSerializer(self.__target, **kwargs)
            serializer.write_state_dict(tensors)
            serializer.close()

        # torch.save subclasses the Pickler it is given (and may set persistent_id on an
        # instance): ours runs first, theirs handles everything else.
        @staticmethod
        def _chain(theirs):
            @functools.wraps(theirs)
            def persistent_id(self, obj):
                pid = _TensorizerPickler.persistent_id(self, obj)
                return theirs(self, obj) if pid is None else pid

            return persistent_id

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            if "persistent_id" in cls.__dict__:
                cls.persistent_id = _TensorizerPickler._chain(cls.persistent_id)

        def __setattr__(self, key, value):
            if key == "persistent_id":
                theirs = value
                value = types.MethodType(
                    _TensorizerPickler._chain(lambda _self, obj: theirs(obj)), self
                )
            super().__setattr__(key, value)

    class _TensorizerUnpickler(pickle.Unpickler):
        """Resolves the sidecar references ``_TensorizerPickler`` wrote; loads the sidecar at the
        first one (so ``.pt`` files without references never need a sidecar)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__target = _loading_target.get()
            self.__tensors: list | None = None

        def load(self):
            try:
                return super().load()
            finally:
                self.__tensors = None

        def __storage(self, idx: int, dtype):
            import torch

            if self.__tensors is None:
                kwargs = _deserializer_kwargs.get() or {}
                load_func = _load_func.get()
                if load_func is not None:
                    self.__tensors = list(load_func(self.__target, kwargs))
                else:
                    with TensorDeserializer(self.__target, **kwargs) as deserializer:
                        self.__tensors = deserializer.tree()
            tensor = self.__tensors[idx]
            # A storage pickled untyped comes back as a uint8 TypedStorage, as torch expects.
            return torch.TypedStorage(
                wrap_storage=tensor.untyped_storage(),
                dtype=torch.uint8 if dtype is None else dtype,
                _internal=True,
            )

        def _tensorizer_load(self, pid):
            """The storage for one of our persistent ids; UnpicklingError for any other id."""
            if (
                self.__target is not None
                and isinstance(pid, tuple)
                and len(pid) >= 3
                and pid[0] == _PID_TAG
            ):
                if pid[1] > _PID_VERSION:
                    raise pickle.UnpicklingError(
                        f"Unsupported TensorizerPickler data version ({pid[1]:d})"
                    )
                if pid[2] != "storage":
                    raise pickle.UnpicklingError(
                        f"Unsupported TensorizerPickler object type ({pid[2]})"
                    )
                idx, dtype = pid[3:]
                return self.__storage(idx, dtype)
            raise pickle.UnpicklingError("unsupported persistent id encountered")

        def persistent_load(self, pid):
            return self._tensorizer_load(pid)

        @staticmethod
        def _chain(theirs):
            @functools.wraps(theirs)
            def persistent_load(self, pid):
                try:
                    return self._tensorizer_load(pid)
                except pickle.UnpicklingError:
                    if not (isinstance(pid, tuple) and pid and pid[0] == _PID_TAG):
                        return theirs(self, pid)
                    raise

            return persistent_load

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            if "persistent_load" in cls.__dict__:
                cls.persistent_load = _TensorizerUnpickler._chain(cls.persistent_load)

        def __setattr__(self, key, value):
            if key == "persistent_load":
                theirs = value
                value = types.MethodType(
                    _TensorizerUnpickler._chain(lambda _self, pid: theirs(pid)), self
                )
                # Before Python 3.13 the C unpickler keeps its own reference, set only through
                # pickle.Unpickler's descriptor, which our class attribute shadows: set it there.
                if inspect.isgetsetdescriptor(pickle.Unpickler.persistent_load):
                    pickle.Unpickler.persistent_load.__set__(self, value)
            super().__setattr__(key, value)

    module = types.ModuleType("tensorizer_pickle")
    module.__getattr__ = lambda name: getattr(pickle, name)
    module.Pickler = _TensorizerPickler
    module.Unpickler = _TensorizerUnpickler
    return module


def _sidecar_for(f) -> str | None:
    if isinstance(f, io.BytesIO):
        logger.warning(
            "Cannot infer .tensors location from io.BytesIO;"
            " not using tensorizer backend"
            " (set the file_obj parameter to choose a location instead)"
        )
        return None
    try:
        name = os.fsdecode(f)
    except TypeError:
        if not hasattr(f, "name"):
            raise
        name = os.fsdecode(f.name)
    return name + ".tensors"


@contextlib.contextmanager
def _target_for(f, var: ContextVar):
    """Inside one torch.save / torch.load call: the sidecar for torch's ``f``."""
    current = var.get()
    if current is None:
        token = var.set(_sidecar_for(f))
    elif callable(current):
        token = var.set(current(f))
    else:
        token = None
    try:
        yield
    finally:
        if token is not None:
            var.reset(token)


class _Patch:
    """``torch.<name>`` replaced by ``make(original)`` while at least one context is active."""

    def __init__(self, name: str, make: Callable) -> None:
        self.name, self.make = name, make
        self.lock = threading.Lock()
        self.count = 0
        self.replaced = None

    def enter(self) -> None:
        import torch

        with self.lock:
            self.count += 1
            if self.count == 1:
                self.replaced = getattr(torch, self.name)
                setattr(torch, self.name, self.make(self.replaced))

    def exit(self) -> None:
        import torch

        with self.lock:
            self.count -= 1
            if self.count == 0:
                setattr(torch, self.name, self.replaced)
                self.replaced = None


def _check_pickle_module(pickle_module) -> None:
    import pickle

    if pickle_module is not None and pickle_module is not pickle:
        raise ValueError(
            "Tensorizer-based torch serialization is incompatible with"
            " using a pickle_module other than the default"
        )


def _make_save(original):
    import pickle

    @functools.wraps(original)
    def save(obj, f, pickle_module: Any = pickle, *args, **kwargs):
        if not _saving_active.get():
            return original(obj, f, pickle_module, *args, **kwargs)
        _check_pickle_module(pickle_module)
        with _target_for(f, _saving_target):
            return original(obj, f, *args, pickle_module=_pickle_module(), **kwargs)

    return save


def _make_load(original):
    @functools.wraps(original)
    def load(f, map_location=None, pickle_module: Any = None, *args, weights_only=None, **kwargs):
        if not _loading_active.get():
            return original(
                f, map_location, pickle_module, *args, weights_only=weights_only, **kwargs
            )
        _check_pickle_module(pickle_module)
        with _target_for(f, _loading_target):
            if _suppress_weights_only.get():
                weights_only = False
            return original(
                f,
                map_location,
                *args,
                pickle_module=_pickle_module(),
                weights_only=weights_only,
                **kwargs,
            )

    return load


_save_patch = _Patch("save", _make_save)
_load_patch = _Patch("load", _make_load)


@contextlib.contextmanager
def tensorizer_saving(
    file_obj: Any | None = None,
    *,
    save_func: Callable[[Any, Iterable[Any], dict], Any] | None = None,
    **kwargs,
):
    """Within this context, ``torch.save`` writes tensor data to a ``.tensors`` sidecar.

    Args:
        file_obj: Where the sidecar goes: anything ``TensorSerializer`` accepts, or a callable
            given ``torch.save``'s ``f`` that returns one (or None: then that call saves
            normally). Default: ``f`` + ``".tensors"``.
        save_func: ``save_func(file_obj, tensors, kwargs)`` replaces the default writing
            (e.g. to write in the background).
        kwargs: Passed to ``TensorSerializer`` (e.g. ``encryption=``).
    """
    tokens = (
        (_saving_active, _saving_active.set(True)),
        (_serializer_kwargs, _serializer_kwargs.set(kwargs)),
        (_saving_target, _saving_target.set(file_obj)),
        (_save_func, _save_func.set(save_func)),
    )
    _save_patch.enter()
    try:
        yield
    finally:
        _save_patch.exit()
        for var, token in reversed(tokens):
            var.reset(token)


@contextlib.contextmanager
def tensorizer_loading(
    file_obj: Any | None = None,
    *,
    load_func: Callable[[Any, dict], Iterable[Any]] | None = None,
    suppress_weights_only: bool = False,
    **kwargs,
):
    """Within this context, ``torch.load`` reads tensor data from the ``.tensors`` sidecar
    ``tensorizer_saving`` wrote.

    Args:
        file_obj: Where the sidecar is: anything ``TensorDeserializer`` accepts, or a callable
            given ``torch.load``'s ``f`` that returns one. Default: ``f`` + ``".tensors"``.
        load_func: ``load_func(file_obj, kwargs) -> tensors`` replaces the default reading.
        suppress_weights_only: Turn ``weights_only=True`` into False inside the context (torch
            refuses a custom pickle module in weights-only loads).
        kwargs: Passed to ``TensorDeserializer`` (e.g. ``device=``, ``encryption=``).
    """
    tokens = (
        (_loading_active, _loading_active.set(True)),
        (_suppress_weights_only, _suppress_weights_only.set(suppress_weights_only)),
        (_deserializer_kwargs, _deserializer_kwargs.set(kwargs)),
        (_loading_target, _loading_target.set(file_obj)),
        (_load_func, _load_func.set(load_func)),
    )
    _load_patch.enter()
    try:
        yield
    finally:
        _load_patch.exit()
        for var, token in reversed(tokens):
            var.reset(token)
