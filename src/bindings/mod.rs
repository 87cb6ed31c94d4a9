//! The Python module `tensorizer_rs._native`: a thin layer over the core. Everything torch-
//! specific (modules, Parameters, dtype casts) lives in the Python package.
mod crypto;
mod cuda;
mod errors;
mod reader;
mod storage;
mod writer;

use pyo3::prelude::*;

pub use errors::to_pyerr;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<reader::PyTensorFile>()?;
    m.add_class::<writer::PyTensorWriter>()?;
    m.add_class::<crate::dlpack::HostTensor>()?;
    cuda::register(m)?;
    m.add_function(wrap_pyfunction!(crypto::derive_key, m)?)?;
    m.add_class::<storage::PyRemoteSource>()?;
    m.add_function(wrap_pyfunction!(storage::write_all, m)?)?;
    m.add_function(wrap_pyfunction!(storage::http_direct_bytes, m)?)?;
    Ok(())
}
