//! The GPU path's Python surface: load into device memory PyTorch owns, and the counters,
//! sizes and availability checks around it. Private API: `tensorizer_rs._cuda` wraps it.
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_pyerr;
use super::reader::PyTensorFile;
use crate::cuda::{self, counters, DeviceSpan, PinnedMode, StagingConfig, StreamHandle};
use crate::error::{Error, Result};
use crate::load::device::{self, DeviceOptions, DeviceTarget};
use crate::load::LoadOptions;

/// `(True, None)` when the CUDA driver loads and initialises, else `(False, reason)`.
#[pyfunction]
fn cuda_available() -> (bool, Option<String>) {
    match cuda::device_count() {
        Ok(0) => (false, Some("CUDA is not available: no CUDA devices".into())),
        Ok(_) => (true, None),
        Err(e) => (false, Some(e.message)),
    }
}

/// Load `targets` = `[(entry_index, device_pointer, nbytes)]` of `file` into device memory of
/// CUDA device `device`, ordered after PyTorch's stream `stream`. Returns
/// `(module_indices, stats)`. `progress(bytes_done, bytes_total)` is called about every 100 ms.
#[pyfunction]
#[pyo3(signature = (file, targets, device, stream, *, num_readers=None, verify_hash=false, key=None,
                    passphrase=None, max_opslimit=None, max_memlimit=None, io=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn cuda_load<'py>(
    py: Python<'py>,
    file: PyRef<'py, PyTensorFile>,
    targets: Vec<(usize, u64, u64)>,
    device: i32,
    stream: u64,
    num_readers: Option<usize>,
    verify_hash: bool,
    key: Option<Vec<u8>>,
    passphrase: Option<Vec<u8>>,
    max_opslimit: Option<u64>,
    max_memlimit: Option<u64>,
    io: Option<String>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<(Vec<u16>, Bound<'py, PyDict>)> {
    let f = file.file()?;
    drop(file);
    let opts = DeviceOptions {
        base: LoadOptions {
            num_readers,
            verify_hash,
            keys: super::crypto::keys_from(key, passphrase, max_opslimit, max_memlimit)?,
            io: io.as_deref().map(str::parse).transpose().map_err(to_pyerr)?,
        },
        device,
        // SAFETY: `tensorizer_rs._cuda` passes PyTorch's current stream of this device (or 0),
        // alive for the length of this call.
        stream: unsafe { StreamHandle::foreign(stream) },
    };
    // SAFETY: `tensorizer_rs._cuda` passes the `data_ptr()` and size of tensors it keeps alive
    // for the length of this call (or pointers into the same memory); the load synchronises
    // its streams before it returns.
    let targets: Vec<DeviceTarget> = targets
        .into_iter()
        .map(|(entry, ptr, nbytes)| DeviceTarget { entry, dest: unsafe { DeviceSpan::new(ptr, nbytes) } })
        .collect();
    let progress = progress.map(|p| p.unbind());
    let raised = super::Raised::default();
    let result = py.detach(|| {
        // Every tick: pending signals (Ctrl-C), then the progress callback if there is one.
        let mut report = |done: u64, total: u64| -> Result<()> {
            raised.attach(|py| {
                py.check_signals()?;
                match &progress {
                    Some(cb) => cb.call1(py, (done, total)).map(drop),
                    None => Ok(()),
                }
            })
        };
        // A panic must not cross into Python as an abort; report it as an error.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            device::load_to_device(&f, &targets, &opts, Some(&mut report))
        }))
        .unwrap_or_else(|_| Err(Error::io("internal error: the CUDA loader panicked")))
    });
    // A callback's or signal handler's own exception wins over our summary of it.
    let (module_idx, stats) = result.map_err(|e| raised.or(e))?;
    let d = PyDict::new(py);
    d.set_item("tensors", stats.tensors)?;
    d.set_item("bytes", stats.bytes)?;
    d.set_item("seconds", stats.seconds)?;
    d.set_item("readers", stats.readers)?;
    d.set_item("staged_bytes", stats.staged_bytes)?;
    d.set_item("pageable_bytes", stats.pageable_bytes)?;
    d.set_item("h2d_copies", stats.h2d_copies)?;
    d.set_item("batched_copy_calls", stats.batched_copy_calls)?;
    d.set_item("zero_fills", stats.zero_fills)?;
    d.set_item("direct_read_bytes", stats.direct_read_bytes)?;
    d.set_item("buffered_read_bytes", stats.buffered_read_bytes)?;
    d.set_item("staging_chunk", stats.staging_chunk)?;
    d.set_item("staging_buffers", stats.staging_buffers)?;
    d.set_item("load_buffers", stats.load_buffers)?;
    d.set_item("read_mode", stats.read_mode)?;
    d.set_item("fs", stats.fs)?;
    d.set_item("local_ranks", stats.local_ranks)?;
    d.set_item("numa_node", stats.numa_node)?;
    d.set_item("reader_cpus", stats.reader_cpus)?;
    d.set_item("decrypted_on_device", stats.decrypted_on_device)?;
    // Why an encrypted load decrypted on the host (the Python side logs it once per load).
    let (why, fallback) = stats.host_decrypt.map_or((None, false), |(w, f)| (Some(w), f));
    d.set_item("host_decrypt", why)?;
    d.set_item("host_decrypt_fallback", fallback)?;
    Ok((module_idx, d))
}

/// The process-wide counters of the GPU path.
#[pyfunction]
fn cuda_counters(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in counters::as_pairs(&counters::snapshot()) {
        d.set_item(k, v)?;
    }
    Ok(d)
}

#[pyfunction]
fn cuda_reset_counters() {
    counters::reset();
}

/// Read or change the staging pool: `(total_bytes, chunk_bytes, streams, pinned)` after the
/// change; `pinned` is `"driver"` (cuMemHostAlloc) or `"thp"` (huge pages, registered).
#[pyfunction]
#[pyo3(signature = (total_bytes=None, chunk_bytes=None, streams=None, pinned=None))]
fn cuda_staging(
    total_bytes: Option<usize>,
    chunk_bytes: Option<usize>,
    streams: Option<usize>,
    pinned: Option<&str>,
) -> PyResult<(usize, usize, usize, &'static str)> {
    let mut c = cuda::staging_config();
    let pinned = match pinned {
        None => c.pinned,
        Some("driver") => PinnedMode::Driver,
        Some("thp") => PinnedMode::HugePages,
        Some(other) => {
            return Err(to_pyerr(Error::value(format!("unknown pinned mode {other:?} (expected driver or thp)"))))
        }
    };
    if total_bytes.is_some() || chunk_bytes.is_some() || streams.is_some() || pinned != c.pinned {
        c = cuda::set_staging_config(StagingConfig {
            total: total_bytes.unwrap_or(c.total),
            chunk: chunk_bytes.unwrap_or(c.chunk),
            streams: streams.unwrap_or(c.streams),
            pinned,
        });
    }
    let name = match c.pinned {
        PinnedMode::Driver => "driver",
        PinnedMode::HugePages => "thp",
    };
    Ok((c.total, c.chunk, c.streams, name))
}

/// Free the idle pinned staging buffers of device `device` (made again when needed).
#[pyfunction]
fn cuda_release_staging(device: i32) -> PyResult<()> {
    cuda::Engine::get(device).map_err(to_pyerr)?.release_staging();
    Ok(())
}

/// Start making, in the background, the staging buffers of device `device` that a load of
/// `uri` with `readers` readers takes (a load that starts meanwhile uses them as they come);
/// returns at once. Failures are left to the load.
#[pyfunction]
#[pyo3(signature = (device, readers=None, uri=None))]
fn cuda_prewarm(device: i32, readers: Option<usize>, uri: Option<&str>) {
    device::prewarm(device, uri, readers);
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_prewarm, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_load, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_counters, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_reset_counters, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_staging, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_release_staging, m)?)?;
    Ok(())
}
