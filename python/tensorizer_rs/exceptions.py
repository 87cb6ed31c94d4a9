"""Exceptions. Names and builtin bases follow CoreWeave's tensorizer, so existing ``except``
clauses keep working; every class also derives from :class:`TensorizerError`."""


class TensorizerError(Exception):
    """Base class of every error raised by tensorizer_rs."""


class NotATensorizerFileError(TensorizerError, ValueError):
    """The bytes are not a ``.tensors`` file (bad magic)."""


class InvalidVersionError(TensorizerError, ValueError):
    """An unknown data version or feature flag (CoreWeave: ``_FileHeader.InvalidVersionError``)."""


class TensorizerFormatError(TensorizerError, ValueError):
    """The file is truncated, inconsistent or otherwise malformed."""


class HashMismatchError(TensorizerError):
    """A stored CRC32/SHA-256 does not match the tensor (only with ``verify_hash=True``)."""


class CryptographyError(TensorizerError):
    """Decryption failed (wrong key, tampered data), or a key is missing or not expected."""


class TensorizerIOError(TensorizerError, OSError):
    """Reading or writing the underlying file or object failed."""


class TensorizerFileNotFoundError(TensorizerIOError, FileNotFoundError):
    """The file or object does not exist."""


class TensorizerValueError(TensorizerError, ValueError):
    """An invalid argument or value."""


class TensorizerTypeError(TensorizerError, TypeError):
    """An argument of the wrong type."""


class TensorizerKeyError(TensorizerError, KeyError):
    """A tensor or module name that does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0]) if self.args else ""


class TensorizerNotImplementedError(TensorizerError, NotImplementedError):
    """A request CoreWeave's reader refuses the same way (e.g. ``load_into_module`` on a file
    written by ``write_state_dict``)."""


class TensorizerUnsupportedError(TensorizerError, RuntimeError):
    """Something this build or machine cannot do (e.g. CUDA without a GPU)."""


__all__ = [name for name in dir() if name.endswith("Error")]
