"""tensorizer-rs: a fast, CoreWeave-compatible tensorizer in Rust.

The public modules and names of CoreWeave's ``tensorizer`` 2.12.1 (``serialization``,
``stream_io``, ``utils``, ``torch_compat``, ``protobuf``, ``tensors_pb2``), so
``import tensorizer_rs as tensorizer`` works for code written against it; the vLLM integration
lives in ``tensorizer_rs.vllm``. Importing the package does not import torch (the functions that
need it do).
"""

from . import _native, serialization, stream_io, torch_compat, utils  # noqa: F401 (eager)
from .encryption import DecryptionParams, EncryptionParams
from .exceptions import (
    CryptographyError,
    HashMismatchError,
    InvalidVersionError,
    NotATensorizerFileError,
    TensorizerError,
    TensorizerFileNotFoundError,
    TensorizerFormatError,
    TensorizerIOError,
    TensorizerKeyError,
    TensorizerNotImplementedError,
    TensorizerTypeError,
    TensorizerUnsupportedError,
    TensorizerValueError,
)
from .serialization import FilterFuncType, TensorDeserializer, TensorSerializer, TensorType

__version__ = _native.__version__

# CoreWeave's __all__ (its serialization.__all__ and submodules; `from tensorizer_rs import *`
# imports protobuf and tensors_pb2 too, which need the protobuf package), then our exceptions.
# tests/test_parity.py checks it against CoreWeave's.
__all__ = [
    "CryptographyError",
    "DecryptionParams",
    "EncryptionParams",
    "FilterFuncType",
    "HashMismatchError",
    "InvalidVersionError",
    "NotATensorizerFileError",
    "TensorDeserializer",
    "TensorSerializer",
    "TensorType",
    "TensorizerError",
    "TensorizerFileNotFoundError",
    "TensorizerFormatError",
    "TensorizerIOError",
    "TensorizerKeyError",
    "TensorizerNotImplementedError",
    "TensorizerTypeError",
    "TensorizerUnsupportedError",
    "TensorizerValueError",
    "protobuf",
    "stream_io",
    "tensors_pb2",
    "torch_compat",
    "utils",
]
