"""Encryption parameters with CoreWeave tensorizer's names, defaults and semantics.

Keys are 32 bytes (XSalsa20-Poly1305). Passphrases derive keys with Argon2id (libsodium's
``crypto_pwhash``); the parameters and salt are stored in every encrypted tensor header.
"""

from __future__ import annotations

import enum
import os

from . import _native
from .exceptions import TensorizerTypeError, TensorizerValueError

__all__ = ["DecryptionParams", "EncryptionParams"]

_KEY_LEN = 32
_SALT_LEN = 16
_ALG_ARGON2ID13 = 2


def _check_key(key: object) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TensorizerTypeError(f"an encryption key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) != _KEY_LEN:
        raise TensorizerValueError(
            f"an encryption key must be exactly {_KEY_LEN} bytes, got {len(key)}"
        )
    return key


def _to_bytes(source: str | bytes, encoding: str) -> bytes:
    data = source.encode(encoding) if isinstance(source, str) else bytes(source)
    if not data:
        raise TensorizerValueError("an encryption passphrase must not be empty")
    return data


class EncryptionParams:
    """How :class:`TensorSerializer` encrypts: a raw key or a passphrase-derived key."""

    class OpsLimit(enum.IntEnum):
        MIN = 1
        INTERACTIVE = 2
        MODERATE = 3
        SENSITIVE = 4

    class MemLimit(enum.IntEnum):
        MIN = 8192
        INTERACTIVE = 64 << 20
        MODERATE = 256 << 20
        SENSITIVE = 1 << 30

    def __init__(self, key: bytes) -> None:
        self._key = _check_key(key)
        self._kdf: tuple | None = None

    def __repr__(self) -> str:  # never show key material
        kind = "passphrase" if self._kdf else "key"
        return f"<EncryptionParams ({kind})>"

    def __eq__(self, other):
        # Same key and key derivation, as CoreWeave's dataclass equality (so also unhashable).
        if other.__class__ is not self.__class__:
            return NotImplemented
        import hmac

        return hmac.compare_digest(self._key, other._key) and self._kdf == other._kdf

    @classmethod
    def random(cls) -> EncryptionParams:
        return cls(os.urandom(_KEY_LEN))

    @classmethod
    def from_string(
        cls,
        source: str | bytes,
        opslimit: int | None = None,
        memlimit: int | None = None,
        salt: bytes | None = None,
        *,
        encoding: str = "utf-8",
    ) -> EncryptionParams:
        if isinstance(opslimit, EncryptionParams.MemLimit):
            raise TensorizerTypeError("opslimit got a MemLimit value; pass an OpsLimit or an int")
        if isinstance(memlimit, EncryptionParams.OpsLimit):
            raise TensorizerTypeError("memlimit got an OpsLimit value; pass a MemLimit or an int")
        ops = int(cls.OpsLimit.MODERATE if opslimit is None else opslimit)
        mem = int(cls.MemLimit.MODERATE if memlimit is None else memlimit)
        if not 1 <= ops <= 0xFFFFFFFF:
            raise TensorizerValueError(f"opslimit {ops} is out of range")
        if not 8192 <= mem <= 4398046510080:
            raise TensorizerValueError(f"memlimit {mem} is out of range")
        if salt is None:
            salt = os.urandom(_SALT_LEN)
        salt = bytes(salt)
        if len(salt) != _SALT_LEN:
            raise TensorizerValueError(f"salt must be exactly {_SALT_LEN} bytes")
        key = _native.derive_key(_to_bytes(source, encoding), ops, mem, salt)
        params = cls(key)
        params._kdf = (ops, mem, _ALG_ARGON2ID13, salt)
        return params

    @property
    def key(self) -> bytes:
        return self._key

    @property
    def salt(self) -> bytes:
        if self._kdf is None:
            raise TensorizerValueError("a raw-key EncryptionParams has no salt")
        return self._kdf[3]

    def _native_args(self) -> dict:
        return {"key": self._key, "kdf": self._kdf}


class DecryptionParams:
    """How :class:`TensorDeserializer` decrypts: a raw key (works for any file) or the
    passphrase a file was written with."""

    def __init__(self) -> None:
        self._key: bytes | None = None
        self._source: bytes | None = None
        self._limits: dict = {}

    def __repr__(self) -> str:
        return f"<DecryptionParams ({'key' if self._key else 'passphrase'})>"

    def __eq__(self, other):
        # Same key or passphrase, as CoreWeave's dataclass equality (so also unhashable).
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self._key, self._source) == (other._key, other._source)

    @classmethod
    def from_key(cls, key: bytes) -> DecryptionParams:
        p = cls()
        p._key = _check_key(key)
        return p

    @classmethod
    def from_string(
        cls,
        source: str | bytes,
        *,
        encoding: str = "utf-8",
        max_opslimit: int | None = None,
        max_memlimit: int | None = None,
    ) -> DecryptionParams:
        """The key is derived with the parameters stored in the file, which are bounded: at
        most ``max_memlimit`` bytes (default ``MemLimit.SENSITIVE``, 1 GiB) and the work of
        ``max_opslimit`` passes over that much memory (default ``OpsLimit.SENSITIVE``, 4). Every
        combination of the presets fits; raise the bounds only for a file you trust."""
        p = cls()
        p._source = _to_bytes(source, encoding)
        for name, value in (("max_opslimit", max_opslimit), ("max_memlimit", max_memlimit)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TensorizerTypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise TensorizerValueError(f"{name} must be at least 1, got {value}")
            p._limits[name] = int(value)
        return p

    @property
    def key(self) -> bytes | None:
        return self._key

    @property
    def source(self) -> bytes | None:
        return self._source

    def _native_args(self) -> dict:
        if self._key is not None:
            return {"key": self._key}
        return {"passphrase": self._source, **self._limits}
