"""Type stubs for the compiled core (src/bindings), checked against the built module by
``mypy.stubtest`` (scripts/test.sh)."""

from typing import Any, Callable, final

__all__ = [
    "HostTensor",
    "RemoteSource",
    "TensorFile",
    "TensorWriter",
    "__version__",
    "copy_file",
    "cuda_available",
    "cuda_counters",
    "cuda_decrypt_kernels",
    "cuda_load",
    "cuda_nvrtc_search_dirs",
    "cuda_open_chunks",
    "cuda_prewarm",
    "cuda_release_staging",
    "cuda_reset_counters",
    "cuda_staging",
    "cuda_tensor_chunks",
    "derive_key",
    "hedged_requests",
    "http_direct_bytes",
    "is_remote",
    "s3_abort_upload",
    "s3_pending_uploads",
    "secretbox_seal",
    "trace_mark",
    "trace_take",
    "uri_scheme",
    "write_all",
]

__version__: str

@final
class HostTensor:
    """A loaded host tensor; import it once with torch.from_dlpack / numpy.from_dlpack."""

    @property
    def nbytes(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Any = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

@final
class TensorFile:
    """An opened .tensors file: header, index and parallel loads."""

    def __new__(
        cls, uri: str, storage: dict[str, Any] | None = None, name: str | None = None
    ) -> TensorFile: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def flags(self) -> int: ...
    @property
    def total_data_bytes(self) -> int: ...
    @property
    def index_len(self) -> int: ...
    @property
    def file_size(self) -> int: ...
    @property
    def encrypted(self) -> bool: ...
    @property
    def pins_version(self) -> bool: ...
    def entries(self) -> list[dict[str, Any]]: ...
    def header_info(self, i: int) -> dict[str, Any]: ...
    def hash_info(self, indices: list[int]) -> list[tuple[bytes, dict[str, bytes]]]: ...
    def read_at(self, offset: int, length: int) -> bytes: ...
    def load(
        self,
        indices: list[int],
        *,
        num_readers: int | None = None,
        verify_hash: bool = False,
        key: bytes | None = None,
        passphrase: bytes | None = None,
        max_opslimit: int | None = None,
        max_memlimit: int | None = None,
    ) -> list[tuple[int, HostTensor]]: ...
    def close(self) -> None: ...

@final
class TensorWriter:
    """Declare entries, then write their bytes (by address) in parallel; commit atomically."""

    def __new__(
        cls,
        uri: str,
        *,
        key: bytes | None = None,
        kdf: tuple[int, int, int, bytes] | None = None,
        storage: dict[str, Any] | None = None,
    ) -> TensorWriter: ...
    @property
    def total_tensor_bytes(self) -> int: ...
    @property
    def tensor_count(self) -> int: ...
    def add(self, entries: list[tuple[int, int, bytes, bytes, list[int], bool]]) -> int: ...
    def write_many(self, items: list[tuple[int, int, int]], threads: int | None = None) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...

@final
class RemoteSource:
    """A remote (or local) object opened for positional reads (``stream_io.open_stream``)."""

    def __new__(cls, uri: str, storage: dict[str, Any] | None = None) -> RemoteSource: ...
    @property
    def size(self) -> int: ...
    @property
    def name(self) -> str: ...
    def read_at(self, offset: int, length: int) -> bytes: ...

def derive_key(passphrase: bytes, opslimit: int, memlimit: int, salt: bytes) -> bytes: ...
def write_all(uri: str, data: bytes, storage: dict[str, Any] | None = None) -> None: ...
def copy_file(path: str, uri: str, storage: dict[str, Any] | None = None) -> None: ...
def http_direct_bytes() -> int: ...
def hedged_requests() -> int: ...
def s3_pending_uploads(
    uri: str, storage: dict[str, Any] | None = None
) -> list[tuple[str, str, int | None]]: ...
def s3_abort_upload(uri: str, upload_id: str, storage: dict[str, Any] | None = None) -> None: ...
def uri_scheme(uri: str) -> str | None: ...
def is_remote(uri: str) -> bool: ...
def trace_take() -> list[tuple[int, str, str, int, int]]: ...
def trace_mark(what: str, a: int = 0, b: int = 0) -> None: ...

# -- CUDA (src/bindings/cuda.rs; wrapped by tensorizer_rs._cuda) --------------------------------
def cuda_available() -> tuple[bool, str | None]: ...
def cuda_load(
    file: TensorFile,
    targets: list[tuple[int, int, int]],
    device: int,
    stream: int,
    *,
    num_readers: int | None = None,
    verify_hash: bool = False,
    key: bytes | None = None,
    passphrase: bytes | None = None,
    max_opslimit: int | None = None,
    max_memlimit: int | None = None,
    io: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[int], dict[str, Any]]: ...
def cuda_counters() -> dict[str, int]: ...
def cuda_reset_counters() -> None: ...
def cuda_staging(
    total_bytes: int | None = None,
    chunk_bytes: int | None = None,
    streams: int | None = None,
    pinned: str | None = None,
) -> tuple[int, int, int, str]: ...
def cuda_release_staging(device: int) -> None: ...
def cuda_prewarm(device: int, readers: int | None = None, uri: str | None = None) -> None: ...

# -- GPU decryption kernels (src/bindings/cuda_crypto.rs; tests and benchmarks) -----------------
def cuda_nvrtc_search_dirs(dirs: list[str]) -> None: ...
def cuda_decrypt_kernels(device: int) -> str: ...
def cuda_open_chunks(
    device: int, key: bytes, chunks: list[tuple[int, int, bytes, bytes]], stream: int = 0
) -> list[str]: ...
def cuda_tensor_chunks(
    file: TensorFile, index: int, key: bytes
) -> tuple[int, int, list[tuple[int, int, bytes, bytes]]]: ...
def secretbox_seal(key: bytes, nonce: bytes, data: bytes) -> tuple[bytes, bytes]: ...
