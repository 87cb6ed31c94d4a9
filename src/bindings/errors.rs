//! Core errors become the Python exception classes of `tensorizer_rs.exceptions`, which keep
//! CoreWeave's names and builtin bases (ValueError, OSError, ...) under one TensorizerError.
use pyo3::prelude::*;

use crate::error::{Error, ErrorKind};

pub fn to_pyerr(e: Error) -> PyErr {
    let class = match e.kind {
        ErrorKind::NotTensorizer => "NotATensorizerFileError",
        ErrorKind::InvalidVersion => "InvalidVersionError",
        ErrorKind::Format => "TensorizerFormatError",
        ErrorKind::HashMismatch => "HashMismatchError",
        ErrorKind::Crypto => "CryptographyError",
        ErrorKind::Io => "TensorizerIOError",
        ErrorKind::NotFound => "TensorizerFileNotFoundError",
        ErrorKind::Value => "TensorizerValueError",
        ErrorKind::Unsupported => "TensorizerUnsupportedError",
    };
    let message = e.to_string();
    Python::attach(|py| {
        let made = py
            .import("tensorizer_rs.exceptions")
            .and_then(|m| m.getattr(class))
            .and_then(|cls| cls.call1((message.clone(),)));
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(message),
        }
    })
}
