"""``open_stream`` with CoreWeave's signature, for side files (configs, tokenizers, key files).

Local paths open as ordinary files (parent directories are created for writing). Remote URIs
(``http(s)://``, ``s3://``) are read and written by the Rust core.

Certificates (``https://`` and S3 endpoints): ``certificate_handling=CAInfo(cacert=...)`` (or
``capath=``) trusts exactly the CAs of that PEM file (directory of PEM files); without it,
``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (``https://``) or ``AWS_CA_BUNDLE`` (``s3://``) name
the bundle, else the system roots apply (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` replace them).
``CAInfo(allow_untrusted=True)`` turns verification off (``https://`` only).
"""

from __future__ import annotations

import io
import os
from typing import Any

from .exceptions import TensorizerValueError

__all__ = ["CAInfo", "open_stream"]

_REMOTE = ("http://", "https://", "s3://")


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


class CAInfo:
    """Certificate settings for ``open_stream(..., certificate_handling=CAInfo(...))``, with
    CoreWeave's signature: exactly one of ``cacert`` (a PEM file of CA certificates, like curl's
    ``--cacert``), ``capath`` (a directory of PEM files, like ``--capath``) or
    ``allow_untrusted=True`` (no verification, like ``--insecure``; ``https://`` only).

    A bundle replaces the system roots, as in curl, requests and botocore.
    """

    __slots__ = ("allow_untrusted", "cacert", "capath")

    def __init__(
        self,
        *,
        cacert: str | None = None,
        capath: str | None = None,
        allow_untrusted: bool = False,
    ):
        if (cacert, capath).count(None) + (not allow_untrusted) != 2:
            raise ValueError(
                "Exactly one of cacert, capath, or allow_untrusted=True"
                " must be specified. For default certificate verification"
                " behaviour, use certificate_handling=None instead of"
                " an explicit CAInfo instance"
            )
        if cacert is not None and not os.path.isfile(cacert):
            raise ValueError(f"Invalid cacert file path {cacert!r}: not a file")
        if capath is not None and not os.path.isdir(capath):
            raise ValueError(f"Invalid capath directory path {capath!r}: not a directory")
        self.cacert = None if cacert is None else os.fspath(cacert)
        self.capath = None if capath is None else os.fspath(capath)
        self.allow_untrusted = bool(allow_untrusted)

    def storage_options(self) -> dict:
        """The Rust core's storage options for these settings."""
        if self.allow_untrusted:
            return {"allow_untrusted": True}
        return {"ca_bundle": self.cacert or self.capath}

    def __repr__(self) -> str:
        for name in ("cacert", "capath"):
            if getattr(self, name) is not None:
                return f"CAInfo({name}={getattr(self, name)!r})"
        return "CAInfo(allow_untrusted=True)"


def open_stream(
    path_uri: Any,
    mode: str = "rb",
    s3_access_key_id: str | None = None,
    s3_secret_access_key: str | None = None,
    s3_endpoint: str | None = None,
    s3_config_path: str | None = None,
    buffer_size: int | None = None,
    force_http: bool | None = None,
    *,
    begin: int | None = None,
    end: int | None = None,
    s3_region_name: str | None = None,
    s3_signature_version: str | None = None,
    certificate_handling: Any = None,
):
    """Open a local path or URI as a binary file object."""
    if not isinstance(mode, str) or "b" not in mode or any(c not in "rwaxb+" for c in mode):
        raise TensorizerValueError(f"invalid mode {mode!r}: only binary modes are supported")
    if isinstance(path_uri, os.PathLike):
        path_uri = os.fspath(path_uri)
    if not isinstance(path_uri, str):
        raise TensorizerValueError(
            f"path_uri must be a str or os.PathLike, not {type(path_uri).__name__}"
        )
    scheme = _scheme(path_uri)
    if scheme in ("http", "https", "s3"):
        storage = {
            "s3_access_key_id": s3_access_key_id,
            "s3_secret_access_key": s3_secret_access_key,
            "s3_endpoint": s3_endpoint,
            "s3_config_path": s3_config_path,
            "force_http": force_http,
            "s3_region_name": s3_region_name,
        }
        storage = {k: v for k, v in storage.items() if v is not None}
        if certificate_handling is not None:
            if not isinstance(certificate_handling, CAInfo):
                raise TypeError(
                    "certificate_handling must either be None"
                    " (for the default certificate verification),"
                    " or a CAInfo object,"
                    f" not {certificate_handling.__class__.__name__}"
                )
            storage.update(certificate_handling.storage_options())
        if "r" in mode and "+" not in mode:
            reader = RemoteReader(path_uri, storage)
            if begin:
                reader.seek(begin)
            return reader
        if scheme != "s3":
            raise TensorizerValueError(f"{scheme}:// URIs can only be opened for reading")
        if mode not in ("wb", "wb+", "ab", "ab+", "w+b", "a+b"):
            raise TensorizerValueError(f"invalid mode {mode!r} for an s3:// URI")
        return RemoteWriter(path_uri, storage)
    if scheme not in ("", "file"):
        raise TensorizerValueError(f"unsupported URI scheme {scheme!r} in {path_uri!r}")
    path = path_uri[len("file://") :] if scheme == "file" else path_uri
    if any(c in mode for c in "wax"):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    f = open(path, mode, buffering=buffer_size or io.DEFAULT_BUFFER_SIZE)  # noqa: SIM115 (returned)
    if begin:
        f.seek(begin)
    return f


class RemoteReader(io.RawIOBase):
    """A seekable, read-only view of an HTTP(S) or S3 object, read with ranged requests.

    ``TensorDeserializer`` recognises it and reads the object natively and in parallel.
    """

    def __init__(self, uri: str, storage: dict) -> None:
        from . import _native

        super().__init__()
        self._source = _native.RemoteSource(uri, storage)
        self._pos = 0
        self._tensorizer_uri = uri
        self._tensorizer_storage = storage
        self.name = uri

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        data = self._source.read_at(self._pos, len(b))
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        data = self._source.read_at(self._pos, max(0, self._source.size - self._pos))
        self._pos += len(data)
        return data


class RemoteWriter(io.BytesIO):
    """An S3 object opened for writing. Small side files are buffered and uploaded at
    ``close()``; a ``TensorSerializer`` given this object streams to S3 itself (multipart)."""

    def __init__(self, uri: str, storage: dict) -> None:
        super().__init__()
        self._tensorizer_uri = uri
        self._tensorizer_storage = storage
        self._claimed = False
        self.name = uri

    def _claim(self) -> None:
        """Called by TensorSerializer, which writes the object itself."""
        self._claimed = True

    def close(self) -> None:
        if not self.closed and not self._claimed:
            from . import _native

            _native.write_all(self._tensorizer_uri, self.getvalue(), self._tensorizer_storage)
        super().close()
