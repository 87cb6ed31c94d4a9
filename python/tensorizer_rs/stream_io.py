"""``open_stream`` with CoreWeave's signature, for side files (configs, tokenizers, key files).

Local paths open as ordinary files (parent directories are created for writing). Remote URIs
(``http(s)://``, ``s3://``) are read and written by the Rust core.
"""

from __future__ import annotations

import io
import os
from typing import Any

from .exceptions import TensorizerValueError

__all__ = ["open_stream"]

_REMOTE = ("http://", "https://", "s3://")


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


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
