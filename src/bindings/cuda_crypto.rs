//! The GPU decryption kernels, reached directly (tests and benchmarks; the load pipeline calls
//! `cuda::secretbox` itself): open sealed chunks in device memory, list a tensor's cipher
//! chunks, seal data on the host, and tell NVRTC where to look.
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::to_pyerr;
use super::reader::PyTensorFile;
use crate::crypto::{secretbox::SecretBox, DecryptPlan, DecryptionKeys, KEY_LEN, MAC_LEN, NONCE_LEN};
use crate::cuda::secretbox::{DeviceChunk, SecretboxKernels, Verdict, Verdicts};
use crate::cuda::{self, nvrtc};
use crate::error::Error;

fn array<const N: usize>(v: &[u8], what: &str) -> PyResult<[u8; N]> {
    v.try_into().map_err(|_| to_pyerr(Error::value(format!("{what} must be {N} bytes, got {}", v.len()))))
}

/// Folders to look for `libnvrtc.so*` in before the system's (e.g. torch's `nvidia/cu13/lib`).
#[pyfunction]
fn cuda_nvrtc_search_dirs(dirs: Vec<PathBuf>) {
    nvrtc::add_search_dirs(dirs);
}

/// Compile (once per process) and load (once per device) the decryption kernels; returns what
/// built them. Raises TensorizerUnsupportedError saying why where they cannot run.
#[pyfunction]
fn cuda_decrypt_kernels(py: Python<'_>, device: i32) -> PyResult<String> {
    py.detach(|| SecretboxKernels::get(device).map(|k| k.description.clone())).map_err(to_pyerr)
}

/// Authenticate and decrypt `chunks` — `(device_address, length, nonce, mac)` — in place on
/// `device`, queued on `stream` (a CUDA stream handle, 0 for the legacy default stream), then
/// wait for them: one of "authentic", "forged" (left as ciphertext) or "pending" per chunk.
#[pyfunction]
#[pyo3(signature = (device, key, chunks, stream=0))]
fn cuda_open_chunks(
    py: Python<'_>,
    device: i32,
    key: Vec<u8>,
    chunks: Vec<(u64, u64, Vec<u8>, Vec<u8>)>,
    stream: u64,
) -> PyResult<Vec<&'static str>> {
    let key = zeroize::Zeroizing::new(array::<KEY_LEN>(&key, "key")?);
    let list = chunks
        .iter()
        .enumerate()
        .map(|(i, (d, n, nonce, mac))| {
            Ok(DeviceChunk::new(*d, *n, array::<NONCE_LEN>(nonce, "nonce")?, array::<MAC_LEN>(mac, "mac")?, i as u32))
        })
        .collect::<PyResult<Vec<_>>>()?;
    py.detach(|| -> crate::error::Result<Vec<&'static str>> {
        let kernels = SecretboxKernels::get(device)?;
        let ctx = cuda::Context::primary(device)?;
        let verdicts = Verdicts::new(&ctx, list.len())?;
        // SAFETY: foreign stream handle from the caller (torch's), of this device's context.
        let stream = unsafe { cuda::StreamHandle::foreign(stream) };
        // SAFETY: the caller names device memory it owns (a test or benchmark buffer).
        unsafe { kernels.open_in_place(&key, &list, &verdicts, stream)? };
        Ok(verdicts
            .read(stream)?
            .into_iter()
            .take(list.len())
            .map(|v| match v {
                Verdict::Authentic => "authentic",
                Verdict::Forged => "forged",
                Verdict::Pending => "pending",
            })
            .collect())
    })
    .map_err(to_pyerr)
}

/// A cipher chunk for Python: `(start, length, nonce, mac)`.
type PyChunk<'py> = (usize, usize, Bound<'py, PyBytes>, Bound<'py, PyBytes>);

/// Tensor `index`'s sealed data: `(data_offset, data_length, [(start, length, nonce, mac)])`
/// with the chunks' ranges relative to the data, checked against `key` (a raw 32-byte key).
#[pyfunction]
fn cuda_tensor_chunks<'py>(
    py: Python<'py>,
    file: &PyTensorFile,
    index: usize,
    key: Vec<u8>,
) -> PyResult<(u64, u64, Vec<PyChunk<'py>>)> {
    let f = file.file()?;
    let e = f
        .entries
        .get(index)
        .ok_or_else(|| pyo3::exceptions::PyIndexError::new_err(format!("no tensor at index {index}")))?;
    let keys = DecryptionKeys::Key(array::<KEY_LEN>(&key, "key")?);
    let plan = py
        .detach(|| -> crate::error::Result<Option<DecryptPlan>> {
            let (_, h) = f.record_header(index)?;
            let info = h.crypt.ok_or_else(|| Error::crypto("the tensor is not encrypted"))?;
            DecryptPlan::new(&keys, &info, e.data_length)
        })
        .map_err(|err| to_pyerr(err.in_tensor(&e.name_lossy()).in_file(f.name())))?;
    let pieces = plan
        .map(|p| {
            p.pieces()
                .iter()
                .map(|c| (c.range.start, c.range.len(), PyBytes::new(py, &c.nonce), PyBytes::new(py, &c.mac)))
                .collect()
        })
        .unwrap_or_default();
    Ok((e.data_offset, e.data_length, pieces))
}

/// Seal `data` with libsodium's crypto_secretbox_detached on the host: `(ciphertext, mac)`.
#[pyfunction]
fn secretbox_seal<'py>(
    py: Python<'py>,
    key: Vec<u8>,
    nonce: Vec<u8>,
    mut data: Vec<u8>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let key = zeroize::Zeroizing::new(array::<KEY_LEN>(&key, "key")?);
    let nonce = array::<NONCE_LEN>(&nonce, "nonce")?;
    let mac = py.detach(|| SecretBox::new(&key).seal(&nonce, &mut data));
    Ok((PyBytes::new(py, &data), PyBytes::new(py, &mac)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_nvrtc_search_dirs, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_decrypt_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_open_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_tensor_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(secretbox_seal, m)?)?;
    Ok(())
}
