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
