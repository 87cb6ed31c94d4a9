//! Key derivation for `EncryptionParams.from_string` (Argon2id, as libsodium's crypto_pwhash).
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::errors::to_pyerr;
use crate::crypto::{self, DecryptionKeys, FirstKdf, KdfLimits};
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
    crypto::validate_params(&params).map_err(to_pyerr)?;
    // The Argon2 call cannot be interrupted: it runs on its own thread while this one checks
    // for Ctrl-C; an interrupted derivation finishes unobserved.
    let passphrase = zeroize::Zeroizing::new(passphrase);
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("tz-kdf".into())
        .spawn(move || {
            let _ = tx.send(crypto::derive_key(&passphrase, &params).map(zeroize::Zeroizing::new));
        })
        .map_err(|e| to_pyerr(Error::io(format!("cannot start the key derivation thread: {e}"))))?;
    let mut rx = rx;
    let key = loop {
        // The receiver goes into the detached closure and back (it may not be shared).
        let (got, back) = py.detach(move || (rx.recv_timeout(crate::load::TICK), rx));
        rx = back;
        match got {
            Ok(result) => break result.map_err(to_pyerr)?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => py.check_signals()?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(to_pyerr(Error::io("internal error: the key derivation thread ended without a result")))
            }
        }
    };
    Ok(PyBytes::new(py, &key[..]))
}

/// The reader's keys from the `key=` / `passphrase=` arguments (a raw key wins), with the
/// bounds on the key derivation a file may ask for (defaults where `None`).
pub(super) fn keys_from(
    key: Option<Vec<u8>>,
    passphrase: Option<Vec<u8>>,
    max_opslimit: Option<u64>,
    max_memlimit: Option<u64>,
) -> PyResult<Option<DecryptionKeys>> {
    Ok(match (key, passphrase) {
        (Some(k), _) => Some(DecryptionKeys::Key(
            k.try_into().map_err(|_| to_pyerr(Error::crypto("a raw key must be exactly 32 bytes")))?,
        )),
        (None, Some(p)) => {
            Some(DecryptionKeys::Passphrase(p, KdfLimits::new(max_opslimit, max_memlimit), FirstKdf::default()))
        }
        (None, None) => None,
    })
}
