//! `TensorWriter`: declare entries, then hand over their bytes (by address, while the Python
//! side keeps the tensors alive) to be hashed, encrypted and written in parallel.
use pyo3::prelude::*;

use super::errors::to_pyerr;
use crate::crypto::EncryptionKeys;
use crate::error::Error;
use crate::format::crypt_info::PwHashParams;
use crate::storage;
use crate::write::{NewEntry, Writer};

#[pyclass(module = "tensorizer_rs._native", name = "TensorWriter")]
pub struct PyTensorWriter {
    inner: Option<Writer>,
}

impl PyTensorWriter {
    fn writer(&mut self) -> PyResult<&mut Writer> {
        self.inner.as_mut().ok_or_else(|| to_pyerr(Error::value("the serializer is closed")))
    }
}

type EntryTuple = (u16, u8, Vec<u8>, Vec<u8>, Vec<u64>, bool);

#[pymethods]
impl PyTensorWriter {
    /// `kdf` = (opslimit, memlimit, alg, salt) when `key` was derived from a passphrase.
    #[new]
    #[pyo3(signature = (uri, *, key=None, kdf=None, storage=None))]
    fn new(
        py: Python<'_>,
        uri: String,
        key: Option<Vec<u8>>,
        kdf: Option<(u64, u64, i32, Vec<u8>)>,
        storage: Option<Bound<'_, pyo3::types::PyDict>>,
    ) -> PyResult<Self> {
        let opts = super::storage::options_from(storage.as_ref())?;
        let keys = match key {
            None => None,
            Some(k) => Some(EncryptionKeys {
                key: k.try_into().map_err(|_| to_pyerr(Error::crypto("an encryption key must be exactly 32 bytes")))?,
                kdf: kdf.map(|(opslimit, memlimit, alg, salt)| PwHashParams { opslimit, memlimit, alg, salt }),
            }),
        };
        let sink = super::interruptible(py, |stop| storage::create_sink_until(&uri, &opts, stop))?;
        Ok(PyTensorWriter { inner: Some(Writer::new(sink, keys)) })
    }

    /// Declare `(module_idx, tensor_type, name, dtype, shape, meta)` entries; returns the first slot.
    fn add(&mut self, entries: Vec<EntryTuple>) -> PyResult<usize> {
        let new = entries
            .into_iter()
            .map(|(module_idx, tensor_type, name, dtype, shape, meta)| NewEntry {
                module_idx,
                tensor_type,
                name,
                dtype,
                shape,
                meta,
            })
            .collect();
        self.writer()?.add(new).map_err(to_pyerr)
    }

    /// Write `(slot, address, length)` items with up to `threads` threads. The caller guarantees
    /// each address points at `length` readable bytes until this call returns.
    #[pyo3(signature = (items, threads=None))]
    fn write_many(
        &mut self,
        py: Python<'_>,
        items: Vec<(usize, usize, usize)>,
        threads: Option<usize>,
    ) -> PyResult<()> {
        let w = self.writer()?;
        let w: &Writer = w;
        let threads = threads.unwrap_or_else(crate::cores).clamp(1, 64).min(items.len().max(1));
        let result = py.detach(|| {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let err: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(slot, addr, len)) = items.get(i) else {
                            break;
                        };
                        // SAFETY: the Python caller keeps the source memory alive for the call.
                        let data: &[u8] =
                            if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(addr as *const u8, len) } };
                        if let Err(e) = w.write(slot, data) {
                            err.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            break;
                        }
                    });
                }
            });
            match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        });
        result.map_err(to_pyerr)
    }

    #[getter]
    fn total_tensor_bytes(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.total_tensor_bytes())
    }

    #[getter]
    fn tensor_count(&self) -> usize {
        self.inner.as_ref().map_or(0, |w| w.len())
    }

    /// Commit the file. On error the destination is left untouched.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        let Some(mut w) = self.inner.take() else {
            return Ok(());
        };
        py.detach(move || w.finish()).map_err(to_pyerr)
    }

    /// Discard everything written; nothing appears at the destination.
    fn abort(&mut self) {
        if let Some(mut w) = self.inner.take() {
            w.abort();
        }
    }
}
