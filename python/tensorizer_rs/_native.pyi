"""Type stubs for the compiled core (src/bindings)."""

from typing import Any

__version__: str

class HostTensor:
    """A loaded host tensor; import it once with torch.from_dlpack / numpy.from_dlpack."""

    nbytes: int
    def __dlpack__(
        self,
        *,
        stream: Any = ...,
        max_version: Any = ...,
        dl_device: Any = ...,
        copy: bool | None = ...,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

class TensorFile:
    """An opened .tensors file: header, index and parallel loads."""

    def __init__(self, uri: str) -> None: ...
    name: str
    version: int
    flags: int
    total_data_bytes: int
    index_len: int
    file_size: int
    encrypted: bool
    pins_version: bool
    def entries(self) -> list[dict[str, Any]]: ...
    def header_info(self, i: int) -> dict[str, Any]: ...
    def load(
        self,
        indices: list[int],
        *,
        num_readers: int | None = ...,
        verify_hash: bool = ...,
        key: bytes | None = ...,
        passphrase: bytes | None = ...,
        max_opslimit: int | None = ...,
        max_memlimit: int | None = ...,
    ) -> list[tuple[int, HostTensor]]: ...
    def close(self) -> None: ...

class TensorWriter:
    """Declare entries, then write their bytes (by address) in parallel; commit atomically."""

    def __init__(
        self, uri: str, *, key: bytes | None = ..., kdf: tuple[int, int, int, bytes] | None = ...
    ) -> None: ...
    total_tensor_bytes: int
    tensor_count: int
    def add(self, entries: list[tuple[int, int, bytes, bytes, list[int], bool]]) -> int: ...
    def write_many(self, items: list[tuple[int, int, int]], threads: int | None = ...) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...

def derive_key(passphrase: bytes, opslimit: int, memlimit: int, salt: bytes) -> bytes: ...

# -- CUDA (src/bindings/cuda.rs; wrapped by tensorizer_rs._cuda) --------------------------------
def cuda_available() -> tuple[bool, str | None]: ...
def cuda_load(
    file: TensorFile,
    targets: list[tuple[int, int, int]],
    device: int,
    stream: int,
    *,
    num_readers: int | None = ...,
    verify_hash: bool = ...,
    key: bytes | None = ...,
    passphrase: bytes | None = ...,
    max_opslimit: int | None = ...,
    max_memlimit: int | None = ...,
    io: str = ...,
    register_readers: int | None = ...,
    progress: Any = ...,
) -> tuple[list[int], dict[str, Any]]: ...
def cuda_counters() -> dict[str, int]: ...
def cuda_reset_counters() -> None: ...
def cuda_staging(
    total_bytes: int | None = ...,
    chunk_bytes: int | None = ...,
    streams: int | None = ...,
    pinned: str | None = ...,
) -> tuple[int, int, int, str]: ...
def cuda_release_staging(device: int) -> None: ...
def cuda_prewarm(device: int, readers: int | None = None) -> None: ...
def http_direct_bytes() -> int: ...
def hedged_requests() -> int: ...
def s3_pending_uploads(
    uri: str, storage: dict | None = None
) -> list[tuple[str, str, int | None]]: ...
def s3_abort_upload(uri: str, upload_id: str, storage: dict | None = None) -> None: ...
def trace_take() -> list[tuple[int, str, str, int, int]]: ...
def trace_mark(what: str, a: int = 0, b: int = 0) -> None: ...
