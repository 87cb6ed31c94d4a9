//! libsodium-compatible encryption of tensor data: XSalsa20-Poly1305 (`crypto_secretbox`,
//! detached MACs) over 2 MiB chunks with sequential nonces, and Argon2id key derivation.
//!
//! STUB: the encryption work (issue 6) fills these in; the load pipeline and writer call only
//! the functions below.
use crate::error::{Error, Result};
use crate::format::crypt_info::CryptInfo;

/// What the reader was given to decrypt with.
#[derive(Clone)]
pub enum DecryptionKeys {
    /// A raw 32-byte key: works for any file, passphrase files included.
    Key([u8; 32]),
    /// A passphrase: the key is derived per the KDF chunk stored in each tensor header.
    Passphrase(Vec<u8>),
}

/// What the writer encrypts with.
#[derive(Clone)]
pub struct EncryptionKeys {
    pub key: [u8; 32],
    /// Present when the key came from a passphrase: stored as a KDF chunk in every header.
    pub kdf: Option<crate::format::crypt_info::PwHashParams>,
}

/// Decrypt `data` in place using the tensor's crypt info. Fails on any MAC mismatch.
pub fn decrypt_tensor(_keys: &DecryptionKeys, _info: &CryptInfo, _data: &mut [u8]) -> Result<()> {
    Err(Error::crypto("decryption is not implemented yet"))
}

/// Encrypt `data` in place (the caller's own copy) and return the crypt info to store.
pub fn encrypt_tensor(_keys: &EncryptionKeys, _data: &mut [u8]) -> Result<CryptInfo> {
    Err(Error::crypto("encryption is not implemented yet"))
}
