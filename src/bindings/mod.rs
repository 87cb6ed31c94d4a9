//! The Python module `tensorizer_rs._native`: a thin layer over the core. Everything torch-
//! specific (modules, Parameters, dtype casts) lives in the Python package.
mod crypto;
mod cuda;
mod cuda_crypto;
mod errors;
mod reader;
mod storage;
mod writer;

use pyo3::prelude::*;

use crate::storage::Stop;

pub use errors::to_pyerr;

/// An exception raised on this thread while a native load ran without the GIL (a signal
/// handler's, a progress callback's): it ends the load and reaches the caller as it was.
#[derive(Default)]
struct Raised(std::sync::Mutex<Option<PyErr>>);

impl Raised {
    /// Run `f` with the GIL; an exception from it is kept and stops the load.
    fn attach(&self, f: impl FnOnce(Python<'_>) -> PyResult<()>) -> crate::error::Result<()> {
        Python::attach(f).map_err(|e| {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            crate::error::Error::io("interrupted")
        })
    }
    /// Python's pending signals, checked from a load's calling thread: Ctrl-C raises
    /// KeyboardInterrupt there (only the main thread runs handlers; elsewhere this is a no-op).
    fn check_signals(&self) -> crate::error::Result<()> {
        self.attach(|py| py.check_signals())
    }
    /// The kept exception, if any, else `e` as a Python exception.
    fn or(self, e: crate::error::Error) -> PyErr {
        self.0.into_inner().unwrap_or_else(|p| p.into_inner()).unwrap_or_else(|| to_pyerr(e))
    }
}

/// Run `f` (an open, a probe, a remote read) on a helper thread while this thread checks
/// Python's signals every [`crate::load::TICK`]: Ctrl-C raises KeyboardInterrupt here within
/// moments, and the remote waits in `f` give up (they watch the [`Stop`] `f` is handed)
/// instead of running into their timeouts and retries.
fn interruptible<T: Send>(py: Python<'_>, f: impl FnOnce(&Stop) -> crate::error::Result<T> + Send) -> PyResult<T> {
    use std::sync::mpsc::{sync_channel, RecvTimeoutError};
    let stop = Stop::new();
    let (tx, rx) = sync_channel(1);
    std::thread::scope(|s| {
        let stop = &stop;
        let spawned = std::thread::Builder::new().name("tz-open".into()).spawn_scoped(s, move || {
            let run = std::panic::AssertUnwindSafe(|| f(stop));
            let result = std::panic::catch_unwind(run)
                .unwrap_or_else(|_| Err(crate::error::Error::io("internal error: the reader panicked")));
            let _ = tx.send(result);
        });
        if let Err(e) = spawned {
            return Err(to_pyerr(crate::error::Error::io(format!("cannot start a thread: {e}"))));
        }
        let mut rx = rx;
        loop {
            // The receiver goes into the detached closure and back (it may not be shared).
            let (got, back) = py.detach(move || (rx.recv_timeout(crate::load::TICK), rx));
            rx = back;
            match got {
                Ok(result) => return result.map_err(to_pyerr),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        stop.stop();
                        // The helper gives up within moments; the scope waits for it.
                        py.detach(move || drop(rx.recv()));
                        return Err(e);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(to_pyerr(crate::error::Error::io("internal error: the reader thread ended")))
                }
            }
        }
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The process's settings are read once, now, before anything they govern is made.
    crate::load::options::env();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<reader::PyTensorFile>()?;
    m.add_class::<writer::PyTensorWriter>()?;
    m.add_class::<crate::dlpack::HostTensor>()?;
    cuda::register(m)?;
    cuda_crypto::register(m)?;
    m.add_function(wrap_pyfunction!(crypto::derive_key, m)?)?;
    m.add_class::<storage::PyRemoteSource>()?;
    m.add_function(wrap_pyfunction!(storage::write_all, m)?)?;
    m.add_function(wrap_pyfunction!(storage::copy_file, m)?)?;
    m.add_function(wrap_pyfunction!(storage::http_direct_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(storage::uri_scheme, m)?)?;
    m.add_function(wrap_pyfunction!(storage::is_remote, m)?)?;
    m.add_function(wrap_pyfunction!(storage::s3_pending_uploads, m)?)?;
    m.add_function(wrap_pyfunction!(storage::hedged_requests, m)?)?;
    m.add_function(wrap_pyfunction!(storage::s3_abort_upload, m)?)?;
    m.add_function(wrap_pyfunction!(trace_take, m)?)?;
    m.add_function(wrap_pyfunction!(trace_mark, m)?)?;
    Ok(())
}

/// The load timeline recorded under `TENSORIZER_RS_TRACE=1`, as `[(monotonic_ns, thread,
/// what, a, b)]`; clears it.
#[pyfunction]
fn trace_take() -> Vec<crate::trace::Event> {
    crate::trace::take()
}

/// Add a mark from Python (bench scripts, the package's allocation steps).
#[pyfunction]
#[pyo3(signature = (what, a=0, b=0))]
fn trace_mark(what: &str, a: u64, b: u64) {
    if crate::trace::enabled() {
        // Python's few mark names are interned once, so they can be `&'static`.
        crate::trace::mark(intern(what), a, b);
    }
}

fn intern(s: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.iter().find(|n| **n == s) {
        return n;
    }
    if names.len() >= 256 {
        return "(other)";
    }
    let n: &'static str = Box::leak(s.to_string().into_boxed_str());
    names.push(n);
    n
}
