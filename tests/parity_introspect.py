"""Describe a tensorizer-like package's public API as JSON (stdout), for test_parity.py.

Usage: python parity_introspect.py PACKAGE   (``tensorizer`` for CoreWeave's, ``tensorizer_rs``)

Run in a subprocess: CoreWeave's package is only importable there. For each public module
(the package, serialization, stream_io, utils, torch_compat, protobuf, tensors_pb2) it lists
``__all__`` and every public name: modules, functions and classes with their signatures
(parameter names, kinds and defaults; annotations are ignored), classes' public members (and
the dunders a user calls) with their kind and signature, enum members, named-tuple fields and
standard-library bases; plain values by type (and value, for numbers, strings and bytes).
Typing constructs and imported modules other than the package's own are left out.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import json
import sys
import types
import typing

MODULES = ("", "serialization", "stream_io", "utils", "torch_compat", "protobuf", "tensors_pb2")
DUNDERS = {
    "__init__",
    "__call__",
    "__enter__",
    "__exit__",
    "__getitem__",
    "__iter__",
    "__len__",
    "__contains__",
    "__hash__",
}
STDLIB_BASES = {"builtins", "abc", "collections.abc", "io", "_io", "contextlib", "enum", "typing"}


def default_of(value):
    if value is inspect.Parameter.empty:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return ["value", repr(value)]
    if isinstance(value, bytes):
        return ["value", repr(value)]
    if isinstance(value, types.ModuleType):
        return ["module", value.__name__.rsplit(".", 1)[-1]]
    return ["type", type(value).__name__]


def signature_of(obj):
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [[p.name, p.kind.name, default_of(p.default)] for p in sig.parameters.values()]


def member_of(cls, name, raw):
    if isinstance(raw, (staticmethod, classmethod)):
        return {"kind": type(raw).__name__, "signature": signature_of(raw.__func__)}
    if isinstance(raw, property) or inspect.isdatadescriptor(raw):
        return {"kind": "attribute"}
    if inspect.isclass(raw):
        return {"kind": "class", **class_of(raw)}
    if callable(raw):
        return {"kind": "method", "signature": signature_of(raw)}
    return {"kind": "value", "type": type(raw).__name__}


def class_of(cls):
    out = {
        "bases": sorted(
            f"{b.__module__}.{b.__qualname__}"
            for b in cls.__mro__[1:]
            if b.__module__ in STDLIB_BASES and b is not object
        ),
        "members": {},
    }
    if issubclass(cls, enum.Enum):
        out["enum"] = {m.name: repr(m.value) for m in cls}
    if issubclass(cls, tuple) and hasattr(cls, "_fields"):
        out["fields"] = list(cls._fields)
    if issubclass(cls, BaseException):
        return out
    init = cls.__dict__.get("__init__")
    if init is not None:
        out["signature"] = signature_of(init)
    for klass in reversed(cls.__mro__[:-1]):
        if klass.__module__ in STDLIB_BASES:
            continue  # inherited standard behaviour (Mapping, BufferedIOBase, ...)
        for name, raw in vars(klass).items():
            if name.startswith("_") and name not in DUNDERS:
                continue
            if isinstance(cls, enum.EnumMeta) and name in out.get("enum", {}):
                continue
            out["members"][name] = member_of(cls, name, raw)
    return out


def is_typing(obj) -> bool:
    return type(obj).__module__ in ("typing", "typing_extensions") or obj in (
        typing.Any,
        typing.Union,
        typing.Optional,
    )


def describe(package: str) -> dict:
    result = {}
    for short in MODULES:
        name = f"{package}.{short}" if short else package
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            result[short] = {"error": f"{type(e).__name__}: {e}"}
            continue
        names = {}
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if isinstance(obj, types.ModuleType):
                if obj.__name__.startswith(package + "."):
                    names[attr] = {"kind": "module"}
                continue
            if is_typing(obj) and attr != "FilterFuncType":
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                # The package's own (generated messages say "tensors_pb2"), not imported ones.
                home = getattr(obj, "__module__", "") or ""
                if not (home == package or home.startswith(package + ".") or home == "tensors_pb2"):
                    continue
            if inspect.isclass(obj):
                names[attr] = {"kind": "class", **class_of(obj)}
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                names[attr] = {"kind": "function", "signature": signature_of(obj)}
            elif attr == "FilterFuncType":
                names[attr] = {"kind": "alias"}
            else:
                value = None
                if isinstance(obj, (bool, int, float, str, bytes)) and not isinstance(
                    obj, enum.Enum
                ):
                    value = repr(obj)
                names[attr] = {"kind": "value", "type": type(obj).__name__, "value": value}
        all_ = getattr(module, "__all__", None)
        result[short] = {"all": None if all_ is None else list(all_), "names": names}
    return result


if __name__ == "__main__":
    json.dump(describe(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
