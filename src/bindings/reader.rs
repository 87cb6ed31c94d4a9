//! `TensorFile`: an opened `.tensors` file, its index, and parallel loads into host tensors.
use std::sync::{Arc, Mutex};

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use super::errors::to_pyerr;
use crate::dlpack::HostTensor;
use crate::format::names::PathComponent;
use crate::load::{self, LoadOptions, TensorFile};
use crate::storage;

// Frozen, with the file behind a lock: `close` from one thread while another loads must not
// meet PyO3's "Already borrowed"; a load in flight keeps its own `Arc` to the file.
#[pyclass(module = "tensorizer_rs._native", name = "TensorFile", frozen)]
pub struct PyTensorFile {
    inner: Mutex<Option<Arc<TensorFile>>>,
}

impl PyTensorFile {
    pub(crate) fn file(&self) -> PyResult<Arc<TensorFile>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .clone()
            .ok_or_else(|| to_pyerr(crate::error::Error::value("I/O operation on a closed TensorDeserializer")))
    }
}

fn path_to_py<'py>(py: Python<'py>, path: &[PathComponent], structured: bool) -> PyResult<Bound<'py, PyAny>> {
    if !structured {
        if let [PathComponent::Str(s)] = path {
            return Ok(s.into_pyobject(py)?.into_any());
        }
    }
    let items: Vec<Bound<'py, PyAny>> = path
        .iter()
        .map(|c| match c {
            PathComponent::Str(s) => s.into_pyobject(py).map(|o| o.into_any()).map_err(PyErr::from),
            PathComponent::Int(i) => i.into_pyobject(py).map(|o| o.into_any()).map_err(PyErr::from),
        })
        .collect::<PyResult<_>>()?;
    Ok(PyTuple::new(py, items)?.into_any())
}

#[pymethods]
impl PyTensorFile {
    /// `name`: what messages call the file instead of `uri` (a stream spilled to a temporary
    /// file is named after the stream, e.g. its `redis://` URI).
    #[new]
    #[pyo3(signature = (uri, storage=None, name=None))]
    fn new(py: Python<'_>, uri: String, storage: Option<Bound<'_, PyDict>>, name: Option<String>) -> PyResult<Self> {
        let opts = super::storage::options_from(storage.as_ref())?;
        let file = super::interruptible(py, |stop| {
            TensorFile::open_until(storage::open_source_named(&uri, &opts, name.as_deref(), stop)?, stop)
        })?;
        Ok(PyTensorFile { inner: Mutex::new(Some(Arc::new(file))) })
    }

    #[getter]
    fn name(&self) -> PyResult<String> {
        Ok(self.file()?.name().to_string())
    }
    #[getter]
    fn version(&self) -> PyResult<u32> {
        Ok(self.file()?.header.version)
    }
    #[getter]
    fn flags(&self) -> PyResult<u8> {
        Ok(self.file()?.header.flags)
    }
    #[getter]
    fn total_data_bytes(&self) -> PyResult<u64> {
        Ok(self.file()?.header.total_data_bytes)
    }
    #[getter]
    fn index_len(&self) -> PyResult<u64> {
        Ok(self.file()?.header.index_len)
    }
    #[getter]
    fn file_size(&self) -> PyResult<u64> {
        Ok(self.file()?.size())
    }
    /// Whether the source pins one version of the object (a strong validator); when it does
    /// not, loads verify the stored hashes whatever `verify_hash` says.
    #[getter]
    fn pins_version(&self) -> PyResult<bool> {
        Ok(self.file()?.source().caps().pins_version)
    }
    #[getter]
    fn encrypted(&self) -> PyResult<bool> {
        Ok(self.file()?.header.has_crypt_info())
    }

    /// One dict per index entry, in file order.
    fn entries<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let f = self.file()?;
        let list = PyList::empty(py);
        // Interned keys and one set of dtype values per distinct dtype: a file of 20,000 small
        // tensors builds 20,000 of these dictionaries in the constructor (per-tensor overhead).
        let mut dtypes: Vec<(&[u8], [Bound<'py, PyAny>; 4])> = Vec::new();
        for (e, path) in f.entries.iter().zip(&f.paths) {
            let d = PyDict::new(py);
            let structured = e.name.first() == Some(&crate::format::names::RECORD_SEPARATOR);
            d.set_item(intern!(py, "name"), path_to_py(py, path, structured)?)?;
            d.set_item(intern!(py, "name_bytes"), PyBytes::new(py, &e.name))?;
            d.set_item(intern!(py, "tensor_type"), e.tensor_type)?;
            let k = match dtypes.iter().position(|(s, _)| *s == e.dtype.stored.as_slice()) {
                Some(k) => k,
                None => {
                    let values = [
                        PyBytes::new(py, &e.dtype.stored).into_any(),
                        e.dtype.container_str().into_pyobject(py)?.into_any(),
                        e.dtype.torch_name.clone().into_pyobject(py)?.into_any(),
                        e.dtype.itemsize.into_pyobject(py)?.into_any(),
                    ];
                    dtypes.push((&e.dtype.stored, values));
                    dtypes.len() - 1
                }
            };
            let [dtype, container, torch_dtype, itemsize] = &dtypes[k].1;
            d.set_item(intern!(py, "dtype"), dtype)?;
            d.set_item(intern!(py, "container"), container)?;
            d.set_item(intern!(py, "torch_dtype"), torch_dtype)?;
            d.set_item(intern!(py, "itemsize"), itemsize)?;
            d.set_item(intern!(py, "shape"), PyTuple::new(py, &e.shape)?)?;
            d.set_item(intern!(py, "data_length"), e.data_length)?;
            d.set_item(intern!(py, "nbytes"), e.expected_nbytes().map_err(to_pyerr)?)?;
            d.set_item(intern!(py, "header_offset"), e.header_offset)?;
            d.set_item(intern!(py, "data_offset"), e.data_offset)?;
            d.set_item(intern!(py, "entry_version"), e.entry_version)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Load index entries `indices` (any order); returns `[(module_idx, HostTensor)]` in the same
    /// order. Raises on the first bad tensor, so nothing partial is ever returned.
    #[pyo3(signature = (indices, *, num_readers=None, verify_hash=false, key=None, passphrase=None,
                        max_opslimit=None, max_memlimit=None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        indices: Vec<usize>,
        num_readers: Option<usize>,
        verify_hash: bool,
        key: Option<Vec<u8>>,
        passphrase: Option<Vec<u8>>,
        max_opslimit: Option<u64>,
        max_memlimit: Option<u64>,
    ) -> PyResult<Vec<(u16, HostTensor)>> {
        let f = self.file()?;
        if let Some(&bad) = indices.iter().find(|&&i| i >= f.entries.len()) {
            return Err(to_pyerr(crate::error::Error::value(format!("no tensor at index {bad}"))));
        }
        let keys = super::crypto::keys_from(key, passphrase, max_opslimit, max_memlimit)?;
        let opts = LoadOptions { num_readers, verify_hash, keys, io: None };
        let raised = super::Raised::default();
        let loaded = py
            .detach(|| {
                let mut tick = || raised.check_signals();
                load::load_to_host(&f, &indices, &opts, Some(&mut tick))
            })
            .map_err(|e| raised.or(e))?;
        Ok(loaded
            .into_iter()
            .map(|t| {
                let e = &f.entries[t.entry];
                let (code, bits) = crate::dlpack::dtype_code(&e.dtype);
                (t.module_idx, HostTensor::new(t.data, e.shape.clone(), code, bits))
            })
            .collect())
    }

    /// For `verify_module`: per entry of `indices`, the bytes its stored hashes cover before the
    /// data (the hashable header) and the hashes, `{"crc32" | "sha256": digest}`. One call for
    /// all entries: the headers are read and parsed without the GIL.
    fn hash_info<'py>(
        &self,
        py: Python<'py>,
        indices: Vec<usize>,
    ) -> PyResult<Vec<(Bound<'py, PyBytes>, Bound<'py, PyDict>)>> {
        let f = self.file()?;
        if let Some(&bad) = indices.iter().find(|&&i| i >= f.entries.len()) {
            return Err(to_pyerr(crate::error::Error::value(format!("no tensor at index {bad}"))));
        }
        let parsed = super::interruptible(py, |stop| {
            indices
                .iter()
                .map(|&i| f.record_header_until(i, stop).map(|(buf, h)| (h.hashable(&buf), h.hashes)))
                .collect::<crate::error::Result<Vec<_>>>()
        })?;
        parsed
            .into_iter()
            .map(|(hashable, hashes)| {
                let d = PyDict::new(py);
                for x in &hashes {
                    d.set_item(if x.kind == 0 { "crc32" } else { "sha256" }, PyBytes::new(py, &x.value))?;
                }
                Ok((PyBytes::new(py, &hashable), d))
            })
            .collect()
    }

    /// The record header of entry `i`: module index, stored hashes, and crypt info summary.
    fn header_info<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Bound<'py, PyDict>> {
        let f = self.file()?;
        if i >= f.entries.len() {
            return Err(to_pyerr(crate::error::Error::value(format!("no tensor at index {i}"))));
        }
        let (_, h) = super::interruptible(py, |stop| f.record_header_until(i, stop))?;
        let d = PyDict::new(py);
        d.set_item("module_idx", h.module_idx)?;
        let hashes = PyDict::new(py);
        for x in &h.hashes {
            hashes.set_item(if x.kind == 0 { "crc32" } else { "sha256" }, PyBytes::new(py, &x.value))?;
        }
        d.set_item("hashes", hashes)?;
        if let Some(info) = &h.crypt {
            use crate::format::crypt_info::CryptChunk;
            let c = PyDict::new(py);
            if let Some(k) = info.kdf() {
                c.set_item("kdf", (k.opslimit, k.memlimit, k.alg, PyBytes::new(py, &k.salt)))?;
            }
            match info.cipher().map_err(to_pyerr)? {
                Some(CryptChunk::XSalsa20Parallel { chunk_size, macs, .. }) => {
                    c.set_item("cipher", "xsalsa20poly1305-chunked")?;
                    c.set_item("chunk_size", *chunk_size)?;
                    c.set_item("chunks", macs.len())?;
                }
                Some(_) => c.set_item("cipher", "xsalsa20poly1305")?,
                None => c.set_item("cipher", py.None())?,
            }
            d.set_item("crypt", c)?;
        }
        Ok(d)
    }

    /// Raw bytes `offset..offset + length` of the file (clamped to its end), for
    /// `TensorDeserializer.to_redis`.
    fn read_at<'py>(&self, py: Python<'py>, offset: u64, length: u64) -> PyResult<Bound<'py, PyBytes>> {
        let f = self.file()?;
        let buf = py.detach(|| f.read_bytes(offset, length)).map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &buf))
    }

    fn close(&self) {
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
