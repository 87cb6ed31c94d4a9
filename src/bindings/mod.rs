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
