//! Key derivation for `EncryptionParams.from_string` (Argon2id, as libsodium's crypto_pwhash).
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::to_pyerr;
use crate::crypto::{self, DecryptionKeys};
use crate::error::Error;
use crate::format::crypt_info::PwHashParams;

const ALG_ARGON2ID13: i32 = 2;

#[pyfunction]
pub fn derive_key<'py>(
    py: Python<'py>,
    passphrase: Vec<u8>,
    opslimit: u64,
    memlimit: u64,
    salt: Vec<u8>,
) -> PyResult<Bound<'py, PyBytes>> {
    let params = PwHashParams { opslimit, memlimit, alg: ALG_ARGON2ID13, salt };
    let key = py.detach(|| crypto::derive_key(&passphrase, &params)).map_err(to_pyerr)?;
    Ok(PyBytes::new(py, &key))
}

/// The reader's keys from the `key=` / `passphrase=` arguments (a raw key wins).
pub(super) fn keys_from(key: Option<Vec<u8>>, passphrase: Option<Vec<u8>>) -> PyResult<Option<DecryptionKeys>> {
    Ok(match (key, passphrase) {
        (Some(k), _) => Some(DecryptionKeys::Key(
            k.try_into().map_err(|_| to_pyerr(Error::crypto("a raw key must be exactly 32 bytes")))?,
        )),
        (None, Some(p)) => Some(DecryptionKeys::Passphrase(p)),
        (None, None) => None,
    })
}
