//! tensorizer-rs: a CoreWeave-compatible `.tensors` reader and writer.
//!
//! Data flows one way: `storage` (bytes from a file, HTTP or S3) → `format` (bytes ↔ structs)
//! → `load` (plan, read, verify, decrypt via `crypto`, place) → `dlpack` → `bindings` (Python).
//! The last two exist only with the `python` feature (the extension module maturin builds):
//! the core builds and tests without Python.
#[cfg(feature = "python")]
pub mod bindings;
pub mod buffer;
pub mod crypto;
pub mod cuda;
#[cfg(feature = "python")]
pub mod dlpack;
pub mod error;
pub mod format;
pub mod load;
pub mod storage;
pub mod trace;
pub mod write;

/// CPUs this process may use, looked up once: the lookup reads cgroup files, and a load
/// starting while others saturate the CPU waits for each of those reads.
pub(crate) fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4))
}
