//! One error type for the whole core. Each kind maps onto one Python exception class
//! (see `bindings::errors`), and the message always names the file and, where known, the tensor.
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The magic bytes are wrong: not a `.tensors` file at all.
    NotTensorizer,
    /// A data version or feature flag this reader does not know.
    InvalidVersion,
    /// Truncated, inconsistent or otherwise malformed bytes.
    Format,
    /// A stored CRC32/SHA-256 does not match the data (only with `verify_hash`).
    HashMismatch,
    /// Authentication failed, a key is missing, or a key was given for a plaintext file.
    Crypto,
    /// An I/O failure of the underlying source or sink.
    Io,
    /// The file or object does not exist.
    NotFound,
    /// The caller asked for something invalid (bad argument).
    Value,
    /// Something valid that this build cannot do (e.g. CUDA without a driver).
    Unsupported,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub file: Option<String>,
    pub tensor: Option<String>,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, file: None, tensor: None, message: message.into() }
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Format, message)
    }
    pub fn value(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Value, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }
    pub fn crypto(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Crypto, message)
    }
    /// Attach the file name unless one is already set (the innermost context wins).
    pub fn in_file(mut self, file: &str) -> Self {
        if self.file.is_none() {
            self.file = Some(file.to_string());
        }
        self
    }
    pub fn in_tensor(mut self, tensor: &str) -> Self {
        if self.tensor.is_none() {
            self.tensor = Some(tensor.to_string());
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if let Some(t) = &self.tensor {
            write!(f, "tensor '{t}': ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::UnexpectedEof => ErrorKind::Format,
            _ => ErrorKind::Io,
        };
        let msg = if kind == ErrorKind::Format { "file is truncated".to_string() } else { e.to_string() };
        Error::new(kind, msg)
    }
}
