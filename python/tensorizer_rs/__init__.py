"""tensorizer-rs: a fast, CoreWeave-compatible tensorizer in Rust.

``TensorSerializer`` / ``TensorDeserializer`` / ``EncryptionParams`` / ``DecryptionParams`` keep
the names and semantics of CoreWeave's ``tensorizer``; the vLLM integration lives in
``tensorizer_rs.vllm``.
"""

from . import _native
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
from .serialization import TensorDeserializer, TensorSerializer, TensorType

__version__ = _native.__version__

__all__ = [
    "CryptographyError",
    "DecryptionParams",
    "EncryptionParams",
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
]
