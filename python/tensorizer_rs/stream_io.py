"""``open_stream``, ``CURLStreamFile``, ``RedisStreamFile`` and ``CAInfo`` with CoreWeave's
signatures, for models and their side files (configs, tokenizers, key files).

Local paths open as ordinary files (parent directories are created for writing). ``http(s)://``
and ``s3://`` objects are read and written by the Rust core: ``open_stream`` returns a
``CURLStreamFile`` for reads (CoreWeave's name; no curl process is involved) and an object that
uploads at ``close()`` for ``s3://`` writes. ``redis://host:port/prefix`` reads the keys
``TensorDeserializer.to_redis`` writes, through the ``redis`` client package.

Certificates (``https://`` and S3 endpoints): ``certificate_handling=CAInfo(cacert=...)`` (or
``capath=``) trusts exactly the CAs of that PEM file (directory of PEM files); without it,
``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (``https://``) or ``AWS_CA_BUNDLE`` (``s3://``) name
the bundle, else the system roots apply (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` replace them).
``CAInfo(allow_untrusted=True)`` turns verification off (a warning is logged once per stream).
"""

from __future__ import annotations

import bisect
import io
import logging
import os
import shutil
import sys
import time
import typing
from io import SEEK_CUR, SEEK_END, SEEK_SET
from typing import Any

from .exceptions import (
    TensorizerFileNotFoundError,
    TensorizerFormatError,
    TensorizerIOError,
    TensorizerTypeError,
    TensorizerValueError,
)

__all__ = ["CAInfo", "CURLStreamFile", "RedisStreamFile", "open_stream"]

logger = logging.getLogger(__name__)

# CoreWeave streams HTTP through this curl binary; here it is informational only.
curl_path = shutil.which("curl")

# CoreWeave's endpoints, used when s3_upload / s3_download are called without one. open_stream
# without any configured endpoint uses AWS's instead (docs/format.md).
default_s3_read_endpoint = "accel-object.ord1.coreweave.com"
default_s3_write_endpoint = "object.ord1.coreweave.com"

_MAX_TCP_BUFFER_SIZE = (1 << 20) if sys.platform == "darwin" else (16 << 20)

# Just keep SEEK_* importable from here, as from CoreWeave's module.
_ = (SEEK_CUR, SEEK_END, SEEK_SET)


def _scheme(uri: str) -> str | None:
    """The URI's scheme, lowercased, or None for a path (the storage layer decides)."""
    from . import _native

    return _native.uri_scheme(uri) if isinstance(uri, str) else None


class CAInfo:
    """Certificate settings for ``open_stream(..., certificate_handling=CAInfo(...))``, with
    CoreWeave's signature: exactly one of ``cacert`` (a PEM file of CA certificates, like curl's
    ``--cacert``), ``capath`` (a directory of PEM files, like ``--capath``) or
    ``allow_untrusted=True`` (no verification, like ``--insecure``).

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
            raise TensorizerValueError(
                "Exactly one of cacert, capath, or allow_untrusted=True"
                " must be specified. For default certificate verification"
                " behaviour, use certificate_handling=None instead of"
                " an explicit CAInfo instance"
            )
        if cacert is not None and not os.path.isfile(cacert):
            raise TensorizerValueError(f"Invalid cacert file path {cacert!r}: not a file")
        if capath is not None and not os.path.isdir(capath):
            raise TensorizerValueError(f"Invalid capath directory path {capath!r}: not a directory")
        self.cacert = None if cacert is None else os.fspath(cacert)
        self.capath = None if capath is None else os.fspath(capath)
        self.allow_untrusted = bool(allow_untrusted)

    @property
    def curl_flags(self):
        """The equivalent curl options (CoreWeave passes these to curl)."""
        if self.cacert is not None:
            return ("--cacert", str(self.cacert))
        if self.capath is not None:
            return ("--capath", str(self.capath))
        return ("--insecure",)

    def __hash__(self):
        return hash(self.curl_flags)

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


def _certificate_options(certificate_handling: Any, uri: str) -> dict:
    if certificate_handling is None:
        return {}
    if not isinstance(certificate_handling, CAInfo):
        raise TensorizerTypeError(
            "certificate_handling must either be None"
            " (for the default certificate verification),"
            " or a CAInfo object,"
            f" not {certificate_handling.__class__.__name__}"
        )
    if certificate_handling.allow_untrusted:
        logger.warning(
            "%s: TLS certificate verification is off (CAInfo(allow_untrusted=True))",
            _shown(uri),
        )
    return certificate_handling.storage_options()


def _shown(uri: str) -> str:
    """A URI for messages: no user info, no query string (it may hold a signature)."""
    from urllib.parse import urlparse

    parts = urlparse(uri)
    if not parts.scheme or not parts.netloc:
        return uri
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?…" if parts.query else "")


class _RangeStream(io.BufferedIOBase):
    """What the two read-only streams share: a position ``_curr`` below ``_limit``, bytes from
    ``_read_span(size)`` (at most ``size``, from ``_curr`` on), CoreWeave's seek rules (forward
    and back; not from the end) and its ``bytes_skipped`` counter."""

    _curr: int
    _limit: int
    bytes_skipped: int

    def _read_span(self, size: int) -> bytes:
        raise NotImplementedError

    def tell(self) -> int:
        return self._curr

    def readinto(self, ba) -> int:
        with memoryview(ba) as mv, mv.cast("B") as view:
            data = self._read_span(len(view))
            view[: len(data)] = data
        return len(data)

    def read(self, size=None) -> bytes:
        if size is None or size < 0:
            size = self._limit - self._curr
        return self._read_span(size)

    def writable(self) -> bool:
        return False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return -1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.close()

    def __del__(self):
        self.close()

    def seek(self, position, whence=SEEK_SET):
        if whence == SEEK_CUR:
            position += self._curr
        elif whence == SEEK_END:
            raise TensorizerValueError("Unsupported `whence`")
        elif whence != SEEK_SET:
            raise TensorizerValueError(f"invalid whence ({whence!r})")
        if position < 0:
            # CoreWeave's message: its CURLStreamFile seeks back by opening again at `begin`.
            raise TensorizerValueError("Invalid begin, must be non-negative")
        if position > self._curr:
            self.bytes_skipped += position - self._curr
        self._curr = position
        return position


class CURLStreamFile(_RangeStream):
    """A read-only, seekable file object over an ``http(s)://`` URL (or an ``s3://`` object from
    ``open_stream``), with CoreWeave's constructor: ``begin``/``end`` select a byte range
    (``end`` exclusive), ``headers`` go with every request.

    CoreWeave streams the body through a curl process; here reads go through the Rust core's
    HTTP client (ranged requests, retries, read-ahead growing from 64 KiB to ``buffer_size``),
    so seeking is cheap in both directions. ``TensorDeserializer`` given one at offset 0 reads the object
    natively, in parallel. Response headers are not kept (``response_headers`` is empty).
    """

    def __init__(
        self,
        uri: str,
        begin: int | None = None,
        end: int | None = None,
        headers: dict[str, Any] | None = None,
        *,
        buffer_size: int | None = None,
        certificate_handling: CAInfo | None = None,
    ) -> None:
        self._open(uri, begin, end, headers, buffer_size, certificate_handling, {})

    def _open(self, uri, begin, end, headers, buffer_size, certificate_handling, storage) -> None:
        from . import _native

        self._closed = True
        self._uri = uri
        if begin is None:
            begin = 0
        elif begin < 0:
            raise TensorizerValueError("Invalid begin, must be non-negative")
        if buffer_size is None:
            buffer_size = 16 << 20
        if end is not None:
            if end <= begin:
                raise TensorizerValueError(
                    "End marker must come strictly after begin marker"
                    f" (requested range: {begin} to {end})"
                )
            # No read-ahead much larger than the requested range.
            max_buffer_size = end - begin + 1
            max_buffer_size -= max_buffer_size % -os.sysconf("SC_PAGE_SIZE")
            buffer_size = min(buffer_size, max_buffer_size)
        self._begin, self._end, self._headers = begin, end, headers
        self._buffer_size = max(1, int(buffer_size))
        self._certificate_handling = certificate_handling
        self._error_context: list[str] = []
        storage = dict(storage)
        storage.update(_certificate_options(certificate_handling, uri))
        if headers:
            storage["http_headers"] = [(str(k), str(v)) for k, v in headers.items()]
        self._storage = storage
        self.popen_latencies: list[float] = getattr(self, "popen_latencies", [])
        self.http_response_latencies: list[float] = getattr(self, "http_response_latencies", [])
        self.bytes_read: int = getattr(self, "bytes_read", 0)
        self.bytes_skipped: int = getattr(self, "bytes_skipped", 0)
        self.read_operations: int = getattr(self, "read_operations", 0)
        start = time.monotonic()
        self._source = _native.RemoteSource(uri, storage)
        self.popen_latencies.append(0.0)  # no process to start
        self.http_response_latencies.append(time.monotonic() - start)
        import http.client  # email and ssl come with it: imported on first use, not with us

        self.response_headers = http.client.HTTPMessage()
        self.name = self._source.name
        self._limit = self._source.size if end is None else min(end, self._source.size)
        self._curr = begin
        self._buf = b""
        self._buf_at = 0
        self._ahead = min(64 << 10, self._buffer_size)  # grows to buffer_size while reads go on
        self._closed = False

    @classmethod
    def _with_storage(cls, uri, storage, **kwargs) -> CURLStreamFile:
        """A stream with storage options (S3 credentials, endpoint) ``open_stream`` resolved."""
        f = cls.__new__(cls)
        f._open(
            uri,
            kwargs.get("begin"),
            kwargs.get("end"),
            None,
            kwargs.get("buffer_size"),
            kwargs.get("certificate_handling"),
            storage,
        )
        return f

    # TensorDeserializer reads the object natively when the stream is untouched at offset 0.
    @property
    def _tensorizer_uri(self) -> str | None:
        if self._closed or self._curr != 0 or self._end is not None:
            return None
        return self._uri

    @property
    def _tensorizer_storage(self) -> dict:
        return self._storage

    def register_error_context(self, msg: str) -> None:
        """Add a line to the message of any error a later read raises."""
        self._error_context.append(msg)

    def _fetch(self, offset: int, length: int) -> bytes:
        try:
            return self._source.read_at(offset, length)
        except OSError as e:
            if self._error_context:
                raise type(e)("\n".join([str(e), *self._error_context])) from None
            raise

    def _read_span(self, size: int) -> bytes:
        if self._closed:
            raise OSError("CURLStreamFile closed.")
        self.read_operations += 1
        size = max(0, min(size, self._limit - self._curr))
        if size == 0:
            return b""
        lo = self._curr - self._buf_at
        if 0 <= lo and lo + size <= len(self._buf):
            data = self._buf[lo : lo + size]
        elif size >= self._ahead:
            data = self._fetch(self._curr, size)
        else:
            # Read ahead, so small sequential reads (headers) cost one request per buffer; it
            # starts small (a 1-byte read fetches 64 KiB, not 16 MiB) and doubles each time.
            self._buf_at = self._curr
            self._buf = self._fetch(self._curr, min(self._ahead, self._limit - self._curr))
            self._ahead = min(self._ahead * 2, self._buffer_size)
            data = self._buf[:size]
        if len(data) != size:
            raise OSError(f"{self.name}: requested {size} bytes, got {len(data)}")
        self._curr += size
        self.bytes_read += size
        return data

    def close(self):
        self._closed = True
        self._buf = b""

    @property
    def closed(self):
        return self._closed

    def readline(self, size=-1) -> bytes:
        raise io.UnsupportedOperation("readline")


# ----------------------------------------------------------------------------- redis://
def _parse_redis_uri(uri: str) -> tuple[str, int, str]:
    from urllib.parse import urlparse

    parts = urlparse(uri)
    if _scheme(uri) != "redis":
        raise TensorizerValueError(f"Invalid Redis URI: {uri}")
    host = parts.hostname
    port = parts.port  # ValueError for a port that is not a number
    if not host:
        raise TensorizerValueError(f"{uri}: no host in the Redis URI (redis://host:port/prefix)")
    prefix = parts.path.lstrip("/")
    if not prefix:
        raise TensorizerValueError(
            f"{uri}: no key prefix in the Redis URI (redis://host:port/prefix)"
        )
    return host, 6379 if port is None else port, prefix


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class RedisStreamFile(_RangeStream):
    """A read-only, seekable file object over the keys ``TensorDeserializer.to_redis`` writes:
    ``{prefix}:{name}:{offset}``, each holding the bytes of the file at ``offset``. ``uri`` is
    ``redis://host[:port]/prefix`` (port 6379 by default, database 0).

    The keys are listed once, at open; reads fetch exactly the ranges asked for (``GETRANGE``,
    pipelined) through the ``redis`` client package. A read that reaches bytes no key holds, or
    a key that changed size, is an ``OSError`` naming the key. ``buffer_size`` is accepted for
    compatibility (the client manages its sockets).
    """

    def __init__(
        self,
        uri: str,
        *,
        begin: int | None = None,
        end: int | None = None,
        buffer_size: int | None = None,
    ) -> None:
        self._redis = None
        init_begin = time.monotonic()
        host, port, prefix = _parse_redis_uri(uri)
        try:
            import redis
        except ImportError:
            raise ImportError(
                "redis:// streams need the redis client package: pip install redis"
            ) from None
        self._errors = redis.RedisError
        self.name = _shown(uri)
        # Bounded waits: an unreachable server or a stalled reply is an error, never a hang.
        self._redis = redis.Redis(
            host=host, port=port, db=0, socket_connect_timeout=10, socket_timeout=60
        )
        try:
            keys = list(self._redis.scan_iter(match=_glob_escape(prefix) + ":*", count=1000))
            entries = []
            for key in keys:
                tail = key.rsplit(b":", 1)[-1]
                if tail.isdigit():  # other keys under the prefix are not part of a file
                    entries.append((int(tail), key))
            entries.sort()
            pipe = self._redis.pipeline(transaction=False)
            for _, key in entries:
                pipe.strlen(key)
            sizes = pipe.execute() if entries else []
        except redis.RedisError as e:
            self.close()
            raise TensorizerIOError(f"{self.name}: Redis at {host}:{port}: {e}") from None
        if not entries:
            self.close()
            raise TensorizerFileNotFoundError(f"{self.name}: no keys under {prefix + ':*'!r}")
        # Empty keys (the data of meta tensors) hold no bytes, and may share an offset with the
        # next record's header.
        held = [(e, n) for e, n in zip(entries, sizes) if n > 0]
        self._indexes = [offset for (offset, _), _ in held]
        self._keys = [key for (_, key), _ in held]
        self._sizes = [n for _, n in held]
        if not held:
            self.close()
            raise TensorizerFormatError(f"{self.name}: every key under {prefix + ':*'!r} is empty")
        for i in range(1, len(held)):
            if self._indexes[i] < self._indexes[i - 1] + self._sizes[i - 1]:
                self.close()
                raise TensorizerFormatError(
                    f"{self.name}: keys {self._keys[i - 1]!r} and {self._keys[i]!r} overlap"
                )
        size = self._indexes[-1] + self._sizes[-1]
        self._limit = size if end is None else min(end, size)
        self._curr = 0
        self.setup_latency = time.monotonic() - init_begin
        self.response_latencies: list[float] = []
        self.bytes_read = 0
        self.bytes_skipped = 0
        self.read_operations = 0
        if begin:
            self.seek(begin)

    def _range(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)``, every one of them held by some key."""
        first = bisect.bisect_right(self._indexes, start) - 1
        plan = []
        pos = start
        i = max(first, 0)
        while pos < stop:
            if i >= len(self._keys) or self._indexes[i] > pos or first < 0:
                raise TensorizerIOError(f"{self.name}: no key holds the bytes at offset {pos}")
            at, size = self._indexes[i], self._sizes[i]
            if pos >= at + size:
                i += 1
                continue
            n = min(stop, at + size) - pos
            plan.append((self._keys[i], pos - at, n))
            pos += n
            i += 1
        pipe = self._redis.pipeline(transaction=False)
        for key, lo, n in plan:
            pipe.getrange(key, lo, lo + n - 1)
        started = time.monotonic()
        try:
            parts = pipe.execute()
        except self._errors as e:
            raise TensorizerIOError(f"{self.name}: {e}") from None
        self.response_latencies.append(time.monotonic() - started)
        for (key, _, n), part in zip(plan, parts):
            if len(part) != n:
                raise TensorizerIOError(
                    f"{self.name}: key {key.decode('utf-8', 'replace')!r} changed or disappeared"
                )
        return b"".join(parts)

    def _read_span(self, size: int) -> bytes:
        if self._redis is None:
            raise OSError("RedisStreamFile closed.")
        self.read_operations += 1
        stop = min(self._curr + max(size, 0), self._limit)
        if stop <= self._curr:
            return b""
        data = self._range(self._curr, stop)
        self._curr = stop
        self.bytes_read += len(data)
        return data

    def close(self):
        client, self._redis = getattr(self, "_redis", None), None
        if client is not None:
            client.close()
        super().close()

    def readline(self, size=-1, /):
        raise io.UnsupportedOperation("readline")


# ----------------------------------------------------------------------------- s3:// helpers
def _s3_storage(
    s3_access_key_id: str | None,
    s3_secret_access_key: str | None,
    s3_endpoint: str | None,
    s3_config_path: Any = None,
    force_http: bool | None = None,
    s3_region_name: str | None = None,
) -> dict:
    storage = {
        "s3_access_key_id": s3_access_key_id,
        "s3_secret_access_key": s3_secret_access_key,
        "s3_endpoint": s3_endpoint,
        "s3_config_path": None if s3_config_path is None else os.fsdecode(s3_config_path),
        "force_http": force_http,
        "s3_region_name": s3_region_name,
    }
    return {k: v for k, v in storage.items() if v is not None}


def s3_upload(
    path: str,
    target_uri: str,
    s3_access_key_id: str | None,
    s3_secret_access_key: str | None,
    s3_endpoint: str | None = default_s3_write_endpoint,
    s3_region_name: str | None = None,
    s3_signature_version: str | None = None,
):
    """Upload the local file ``path`` to ``target_uri`` (``s3://bucket/key``), streaming; the
    object appears only when complete. ``s3_signature_version`` is accepted and ignored
    (requests are SigV4-signed)."""
    from . import _native

    del s3_signature_version
    if _scheme(target_uri) != "s3":
        raise TensorizerValueError(f"Invalid S3 URI: {target_uri}")
    storage = _s3_storage(
        s3_access_key_id, s3_secret_access_key, s3_endpoint, s3_region_name=s3_region_name
    )
    _native.copy_file(os.fspath(path), target_uri, storage)


def s3_download(
    path_uri: str,
    s3_access_key_id: str | None,
    s3_secret_access_key: str | None,
    s3_endpoint: str | None = default_s3_read_endpoint,
    s3_region_name: str | None = None,
    s3_signature_version: str | None = None,
    buffer_size: int | None = None,
    begin: int | None = None,
    end: int | None = None,
    certificate_handling: CAInfo | None = None,
) -> CURLStreamFile:
    """A ``CURLStreamFile`` reading ``path_uri`` (``s3://bucket/key``) directly (CoreWeave reads
    a presigned URL with curl). ``s3_signature_version`` is accepted and ignored."""
    del s3_signature_version
    if _scheme(path_uri) != "s3":
        raise TensorizerValueError(f"Invalid S3 URI: {path_uri}")
    storage = _s3_storage(
        s3_access_key_id, s3_secret_access_key, s3_endpoint, s3_region_name=s3_region_name
    )
    return CURLStreamFile._with_storage(
        path_uri,
        storage,
        begin=begin,
        end=end,
        buffer_size=buffer_size,
        certificate_handling=certificate_handling,
    )


def open_stream(
    path_uri: str | os.PathLike,
    mode: str = "rb",
    s3_access_key_id: str | None = None,
    s3_secret_access_key: str | None = None,
    s3_endpoint: str | None = None,
    s3_config_path: str | bytes | os.PathLike | None = None,
    buffer_size: int | None = None,
    force_http: bool | None = None,
    *,
    begin: int | None = None,
    end: int | None = None,
    s3_region_name: str | None = None,
    s3_signature_version: str | None = None,
    certificate_handling: CAInfo | None = None,
) -> CURLStreamFile | RedisStreamFile | typing.BinaryIO:
    """Open a local path, ``http(s)://`` URL, ``s3://`` URI or ``redis://`` prefix as a binary
    file object, as CoreWeave's ``open_stream`` does (same modes, same errors for others).

    ``s3_signature_version`` is accepted and ignored (requests are SigV4-signed).
    """
    if isinstance(path_uri, os.PathLike):
        local_only = True
        path_uri = os.fspath(path_uri)
    else:
        local_only = False
    if not isinstance(path_uri, str):
        raise TensorizerTypeError(
            f"path_uri must be a str or os.PathLike, not {type(path_uri).__name__}"
        )
    if not isinstance(mode, str):
        raise TensorizerTypeError(f"mode must be a str, not {type(mode).__name__}")
    scheme = None if local_only else _scheme(path_uri)
    normalized_mode = "".join(sorted(mode))

    if scheme in ("http", "https"):
        if normalized_mode != "br":
            raise TensorizerValueError(
                f'Only the mode "rb" is valid when opening http(s):// streams, not {mode!r}.'
            )
        return CURLStreamFile(
            path_uri,
            buffer_size=buffer_size,
            begin=begin,
            end=end,
            certificate_handling=certificate_handling,
        )
    if scheme == "redis":
        if normalized_mode != "br":
            raise TensorizerValueError(
                f'Only the mode "rb" is valid when opening redis:// streams, not {mode!r}.'
            )
        return RedisStreamFile(path_uri, buffer_size=buffer_size, begin=begin, end=end)
    if scheme == "s3":
        if normalized_mode not in ("br", "bw", "ab", "+bw", "+ab"):
            raise TensorizerValueError(
                'Only the modes "rb", "wb[+]", and "ab[+]" are valid when opening s3:// streams,'
                f" not {mode!r}."
            )
        storage = _s3_storage(
            s3_access_key_id,
            s3_secret_access_key,
            s3_endpoint,
            s3_config_path,
            force_http,
            s3_region_name,
        )
        if "w" in mode or "a" in mode:
            storage.update(_certificate_options(certificate_handling, path_uri))
            return _S3Writer(path_uri, storage)
        return CURLStreamFile._with_storage(
            path_uri,
            storage,
            begin=begin,
            end=end,
            buffer_size=buffer_size,
            certificate_handling=certificate_handling,
        )
    if scheme not in (None, "file"):
        raise TensorizerValueError(f"unsupported URI scheme {scheme!r} in {path_uri!r}")

    path = path_uri[len("file://") :] if scheme == "file" else path_uri
    if "b" not in normalized_mode:
        raise TensorizerValueError(
            'Only binary modes ("rb", "wb", "wb+", etc.) are valid when opening local file'
            f" streams, not {mode!r}."
        )
    if any(c in normalized_mode for c in "wax"):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
    if buffer_size is None:
        buffer_size = io.DEFAULT_BUFFER_SIZE
    handle = open(path, mode, buffering=buffer_size)  # noqa: SIM115 (returned)
    handle.seek(begin or 0)
    return handle


class _S3Writer(io.BytesIO):
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
