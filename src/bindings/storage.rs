//! Storage options from Python keyword arguments (CoreWeave's `open_stream` names), and the
//! small remote-file API behind `tensorizer_rs.stream_io.open_stream`.
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::to_pyerr;
use crate::error::Error;
use crate::storage::{self, Source, StorageOptions};

/// Build options from a dict such as `{"s3_access_key_id": ..., "s3_endpoint": ...}`, over
/// the environment's (`load::options::storage_options`). Unknown keys are an error so a typo
/// is not silently ignored.
pub fn options_from(d: Option<&Bound<'_, PyDict>>) -> PyResult<StorageOptions> {
    let mut o = crate::load::options::storage_options();
    let Some(d) = d else { return Ok(o) };
    for (k, v) in d.iter() {
        let key: String = k.extract()?;
        if v.is_none() {
            continue;
        }
        match key.as_str() {
            "s3_access_key_id" => o.s3_access_key_id = Some(v.extract()?),
            "s3_secret_access_key" => o.s3_secret_access_key = Some(v.extract()?),
            "s3_session_token" => o.s3_session_token = Some(v.extract()?),
            "s3_endpoint" => o.s3_endpoint = Some(v.extract()?),
            "s3_region_name" | "s3_region" => o.s3_region = Some(v.extract()?),
            "s3_config_path" => o.s3_config_path = Some(v.extract::<String>()?.into()),
            "force_http" => o.force_http = Some(v.extract()?),
            "http_headers" => o.http_headers = v.extract()?,
            "max_concurrency" => o.max_concurrency = Some(v.extract()?),
            "request_size" => o.request_size = Some(v.extract()?),
            "http_direct" => o.http_direct = Some(v.extract()?),
            "ca_bundle" => o.ca_bundle = Some(v.extract::<std::path::PathBuf>()?),
            "allow_untrusted" => o.allow_untrusted = v.extract()?,
            "stall_timeout" => o.stall_timeout = Some(seconds(&key, v.extract()?)?),
            "hedge_after" => o.hedge_after = Some(seconds(&key, v.extract()?)?),
            other => {
                return Err(to_pyerr(Error::value(format!("unknown storage option {other:?}"))));
            }
        }
    }
    Ok(o)
}

fn seconds(key: &str, v: f64) -> PyResult<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v)
        .map_err(|_| to_pyerr(Error::value(format!("storage option {key:?} must be a number of seconds >= 0"))))
}

/// A remote (or local) object opened for positional reads.
#[pyclass(module = "tensorizer_rs._native", name = "RemoteSource")]
pub struct PyRemoteSource {
    inner: Box<dyn Source>,
}

#[pymethods]
impl PyRemoteSource {
    #[new]
    #[pyo3(signature = (uri, storage=None))]
    fn new(py: Python<'_>, uri: String, storage: Option<Bound<'_, PyDict>>) -> PyResult<Self> {
        let opts = options_from(storage.as_ref())?;
        let inner = super::interruptible(py, |stop| storage::open_source_until(&uri, &opts, stop))?;
        Ok(PyRemoteSource { inner })
    }
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }
    #[getter]
    fn name(&self) -> String {
        self.inner.describe().to_string()
    }
    fn read_at<'py>(&self, py: Python<'py>, offset: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let end = offset.saturating_add(length as u64).min(self.inner.size());
        let n = end.saturating_sub(offset) as usize;
        let mut buf = vec![0u8; n];
        let source = &self.inner;
        let buf = super::interruptible(py, move |stop| {
            if n > 0 {
                source.read(offset, &mut buf, stop)?;
            }
            Ok(buf)
        })?;
        Ok(PyBytes::new(py, &buf))
    }
}

/// Write a whole object (side files: configs, tokenizers, keys); it appears only when complete.
#[pyfunction]
#[pyo3(signature = (uri, data, storage=None))]
pub fn write_all(py: Python<'_>, uri: String, data: Vec<u8>, storage: Option<Bound<'_, PyDict>>) -> PyResult<()> {
    let opts = options_from(storage.as_ref())?;
    py.detach(|| storage::write_all(&uri, &opts, &data)).map_err(to_pyerr)
}

/// Copy the local file `path` to `uri` (an `s3://` object or a path), streaming; it appears only
/// when complete. Ctrl-C stops it.
#[pyfunction]
#[pyo3(signature = (path, uri, storage=None))]
pub fn copy_file(py: Python<'_>, path: String, uri: String, storage: Option<Bound<'_, PyDict>>) -> PyResult<()> {
    let opts = options_from(storage.as_ref())?;
    let raised = super::Raised::default();
    py.detach(|| storage::copy(&path, &uri, &opts, &mut || raised.check_signals())).map_err(|e| raised.or(e))
}

/// The scheme of `uri`, lowercased, or None for a plain path (`storage::scheme`).
#[pyfunction]
pub fn uri_scheme(uri: &str) -> Option<String> {
    storage::scheme(uri)
}

/// Whether `uri` names a remote object (`http(s)://`, `s3://`) rather than a local file.
#[pyfunction]
pub fn is_remote(uri: &str) -> bool {
    storage::is_remote(uri)
}

/// Body bytes plain-HTTP reads have received straight into their buffers, process-wide (tests
/// check which path a load took).
#[pyfunction]
pub fn http_direct_bytes() -> u64 {
    storage::http_direct_bytes()
}

/// The pending multipart uploads under `s3://bucket/prefix`: `[(uri, upload_id, initiated)]`,
/// `initiated` in seconds since the epoch (or `None`).
#[pyfunction]
#[pyo3(signature = (uri, storage=None))]
pub fn s3_pending_uploads(
    py: Python<'_>,
    uri: String,
    storage: Option<Bound<'_, PyDict>>,
) -> PyResult<Vec<(String, String, Option<i64>)>> {
    let opts = options_from(storage.as_ref())?;
    let uploads = super::interruptible(py, |stop| storage::s3_pending_uploads(&uri, &opts, stop))?;
    Ok(uploads.into_iter().map(|u| (u.uri, u.upload_id, u.initiated)).collect())
}

/// Abort the multipart upload `upload_id` of `s3://bucket/key`.
#[pyfunction]
#[pyo3(signature = (uri, upload_id, storage=None))]
pub fn s3_abort_upload(
    py: Python<'_>,
    uri: String,
    upload_id: String,
    storage: Option<Bound<'_, PyDict>>,
) -> PyResult<()> {
    let opts = options_from(storage.as_ref())?;
    super::interruptible(py, |stop| storage::s3_abort_upload(&uri, &upload_id, &opts, stop))
}

/// Read requests re-issued because they stalled while others flowed, process-wide (tests).
#[pyfunction]
pub fn hedged_requests() -> u64 {
    storage::hedged_requests()
}
