//! libsodium-compatible encryption of tensor data: XSalsa20-Poly1305 (`crypto_secretbox`,
//! detached MACs) over 2 MiB chunks with sequential nonces, and Argon2id key derivation
//! (spec §9).
//!
//! The load pipeline calls [`decrypt_tensor`] (or, to decrypt chunk by chunk as data arrives,
//! [`DecryptPlan`]); the writer calls [`encrypt_tensor`] or, to refuse nonce reuse within a file,
//! [`Encryptor::encrypt`]. Chunks of one tensor are processed in parallel on rayon's pool.
//!
//! The construction is the `crypto_secretbox` crate's `SecretBox<C>` (verify, then decrypt) with
//! our own XSalsa20 keystream as its cipher (8 blocks per AVX2/AVX-512VL step, portable scalar
//! elsewhere; `salsa`, `secretbox`): about 3x the crate's stock XSalsa20Poly1305, which the
//! tests use as the reference. `examples/crypto_bench.rs` measures it. The GPU path
//! (`crate::cuda::secretbox`) opens the same boxes on the device.
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rayon::prelude::*;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::format::crypt_info::{CryptChunk, CryptInfo, PwHashParams};
pub use crate::format::crypt_info::{MAC_LEN, NONCE_LEN};

pub mod kdf;
pub mod salsa;
pub mod secretbox;

pub use kdf::{clear_key_cache, derive_key, derive_key_cached, validate_params, KdfLimits, ALG_ARGON2ID13, SALT_LEN};
use secretbox::{nonce_add, SecretBox};

/// Key size of XSalsa20-Poly1305.
pub const KEY_LEN: usize = 32;
/// The writer's chunk size: each 2 MiB of a tensor is sealed on its own.
pub const CHUNK_SIZE: usize = 2 << 20;

/// The message for every MAC failure; the caller adds the file and tensor names.
pub const AUTH_FAILED: &str = "authentication failed — wrong key or corrupted data";

/// What the reader was given to decrypt with. Zeroized on drop; `Debug` never shows the secret.
#[derive(Clone)]
pub enum DecryptionKeys {
    /// A raw 32-byte key: works for any file, passphrase files included.
    Key([u8; 32]),
    /// A passphrase: the key is derived per the KDF chunk stored in each tensor header, whose
    /// parameters must be within the limits, and the same for every tensor (see [`FirstKdf`]).
    Passphrase(Vec<u8>, KdfLimits, FirstKdf),
}

/// The key-derivation settings of the first tensor a passphrase opened, shared by its clones.
/// CoreWeave's writer stores one setting (parameters and salt) in every tensor of a file; a file
/// whose tensors carry different ones would buy a full derivation (up to the limits' seconds
/// and memory) with each ~100-byte header, so every later tensor must match the first.
#[derive(Clone, Default)]
pub struct FirstKdf(Arc<OnceLock<PwHashParams>>);

impl Drop for DecryptionKeys {
    fn drop(&mut self) {
        match self {
            DecryptionKeys::Key(k) => k.zeroize(),
            DecryptionKeys::Passphrase(p, ..) => p.zeroize(),
        }
    }
}

impl fmt::Debug for DecryptionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecryptionKeys::Key(_) => f.write_str("DecryptionKeys::Key(<redacted>)"),
            DecryptionKeys::Passphrase(_, l, _) => write!(f, "DecryptionKeys::Passphrase(<redacted>, {l:?})"),
        }
    }
}

impl DecryptionKeys {
    /// A passphrase with the default [`KdfLimits`].
    pub fn passphrase(p: Vec<u8>) -> Self {
        DecryptionKeys::Passphrase(p, KdfLimits::default(), FirstKdf::default())
    }

    /// The key that opens a tensor with this crypt info: the raw key as-is, or the passphrase
    /// run through the tensor's KDF chunk (cached, so a file derives once).
    pub fn key_for(&self, info: &CryptInfo) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        self.key_for_until(info, &|| false)
    }

    /// [`DecryptionKeys::key_for`], giving up with an error once `stop()` says so while a
    /// key derivation runs (see [`derive_key_cached`]).
    pub fn key_for_until(&self, info: &CryptInfo, stop: &dyn Fn() -> bool) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        match self {
            DecryptionKeys::Key(k) => Ok(Zeroizing::new(*k)),
            DecryptionKeys::Passphrase(p, limits, first) => match info.kdf() {
                Some(params) => {
                    if first.0.get_or_init(|| params.clone()) != params {
                        return Err(Error::crypto(
                            "this tensor's key-derivation settings (cost or salt) differ from the \
                             first encrypted tensor's; a file has one (CoreWeave's writer stores the \
                             same in every tensor), so this file is refused rather than derive again",
                        ));
                    }
                    derive_key_cached(p, params, limits, stop)
                }
                None => Err(Error::crypto(
                    "a passphrase was given, but the tensor has no key-derivation parameters \
                     (it was encrypted with a raw key; pass the key instead)",
                )),
            },
        }
    }
}

/// What the writer encrypts with. Zeroized on drop; `Debug` never shows the key.
#[derive(Clone)]
pub struct EncryptionKeys {
    pub key: [u8; 32],
    /// Present when the key came from a passphrase: stored as a KDF chunk in every header.
    pub kdf: Option<PwHashParams>,
}

impl Drop for EncryptionKeys {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptionKeys").field("key", &"<redacted>").field("kdf", &self.kdf).finish()
    }
}

impl EncryptionKeys {
    /// A raw key supplied by the caller.
    pub fn from_key(key: [u8; KEY_LEN]) -> Self {
        EncryptionKeys { key, kdf: None }
    }

    /// A fresh random raw key (`EncryptionParams.random()`).
    pub fn random() -> Result<Self> {
        Ok(Self::from_key(random_key()?))
    }

    /// A key derived from a passphrase (`EncryptionParams.from_string`): Argon2id with these
    /// limits and `salt` (random when `None`). The parameters go into every tensor header.
    pub fn from_passphrase(
        passphrase: &[u8],
        opslimit: u64,
        memlimit: u64,
        salt: Option<[u8; SALT_LEN]>,
    ) -> Result<Self> {
        let salt = match salt {
            Some(s) => s,
            None => random_salt()?,
        };
        let params = PwHashParams { opslimit, memlimit, alg: ALG_ARGON2ID13, salt: salt.to_vec() };
        let key = derive_key(passphrase, &params)?;
        Ok(EncryptionKeys { key, kdf: Some(params) })
    }
}

fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| Error::crypto(format!("the system random number generator failed: {e}")))
}

/// 32 random bytes from the OS generator.
pub fn random_key() -> Result<[u8; KEY_LEN]> {
    let mut k = [0u8; KEY_LEN];
    fill_random(&mut k)?;
    Ok(k)
}

/// A random 16-byte Argon2 salt.
pub fn random_salt() -> Result<[u8; SALT_LEN]> {
    let mut s = [0u8; SALT_LEN];
    fill_random(&mut s)?;
    Ok(s)
}

/// A random 24-byte nonce.
pub fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n)?;
    Ok(n)
}

fn auth_failed() -> Error {
    Error::crypto(AUTH_FAILED)
}

/// One sealed piece of a tensor's data: its byte range, nonce and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub range: Range<usize>,
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
}

/// Everything needed to open one tensor's data: the resolved key and the pieces. Build it once
/// per tensor, then open all pieces at once ([`DecryptPlan::open_all`]) or one by one as their
/// bytes arrive ([`DecryptPlan::open_piece`]); `&self` methods, safe to share between threads.
pub struct DecryptPlan {
    cipher: SecretBox,
    /// For the device path, which passes it to the kernels (`cuda::secretbox`).
    key: Zeroizing<[u8; KEY_LEN]>,
    pieces: Vec<Piece>,
}

impl fmt::Debug for DecryptPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptPlan").field("pieces", &self.pieces).finish_non_exhaustive()
    }
}

impl DecryptPlan {
    /// Plan the decryption of `data_len` bytes described by `info`. `Ok(None)` when there is
    /// nothing to do (no data). Fails when the crypt info does not fit the data, when the tensor
    /// is not encrypted but has data, or when no key can be had (passphrase without KDF chunk,
    /// bad KDF parameters).
    pub fn new(keys: &DecryptionKeys, info: &CryptInfo, data_len: u64) -> Result<Option<Self>> {
        Self::new_until(keys, info, data_len, &|| false)
    }

    /// [`DecryptPlan::new`], giving up once `stop()` says so while a key derivation runs.
    pub fn new_until(
        keys: &DecryptionKeys,
        info: &CryptInfo,
        data_len: u64,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<Self>> {
        let cipher_chunk = info.cipher()?;
        if data_len == 0 {
            // The real reader skips decryption of empty data, whatever the MACs say.
            return Ok(None);
        }
        let len = usize::try_from(data_len).map_err(|_| Error::format("tensor data is too large for this platform"))?;
        let pieces = match cipher_chunk {
            None => return Err(Error::crypto("tensor is not encrypted, but decryption was requested")),
            Some(CryptChunk::XSalsa20Sequential { nonce, mac }) => {
                vec![Piece { range: 0..len, nonce: *nonce, mac: *mac }]
            }
            Some(CryptChunk::XSalsa20Parallel { chunk_size, nonce, macs }) => match macs.len() {
                0 => return Err(Error::format(format!("encrypted tensor of {len} bytes carries no MACs"))),
                // One box over all the data, whatever chunk_size says (as the real reader does).
                1 => vec![Piece { range: 0..len, nonce: *nonce, mac: macs[0] }],
                n => {
                    let expected = data_len.div_ceil((*chunk_size).max(1));
                    if n as u64 != expected {
                        return Err(Error::format(format!(
                            "encrypted tensor of {len} bytes in chunks of {chunk_size} needs {expected} MACs, \
                             but its header has {n}"
                        )));
                    }
                    // chunk_size * (n - 1) < len, so it fits usize.
                    let cs = *chunk_size as usize;
                    macs.iter()
                        .enumerate()
                        .map(|(i, mac)| Piece {
                            range: i * cs..(i + 1).saturating_mul(cs).min(len),
                            nonce: nonce_add(nonce, i as u64),
                            mac: *mac,
                        })
                        .collect()
                }
            },
            Some(CryptChunk::Kdf(_)) => return Err(Error::format("a key-derivation chunk is not a cipher")),
        };
        let key = keys.key_for_until(info, stop)?;
        Ok(Some(DecryptPlan { cipher: SecretBox::new(&key), key, pieces }))
    }

    /// The key that opens this tensor (for the GPU kernels' arguments; zeroed with the plan).
    pub fn key(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// The pieces, in data order; their ranges tile `0..data_len`.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Authenticate and decrypt piece `i` in place; `data` is exactly that piece's bytes.
    pub fn open_piece(&self, i: usize, data: &mut [u8]) -> Result<()> {
        let p = self.pieces.get(i).ok_or_else(|| Error::value(format!("no cipher piece {i}")))?;
        if data.len() != p.range.len() {
            return Err(Error::value(format!("cipher piece {i} is {} bytes, got {}", p.range.len(), data.len())));
        }
        if self.cipher.open(&p.nonce, &p.mac, data) {
            Ok(())
        } else {
            Err(auth_failed())
        }
    }

    /// Authenticate and decrypt all of `data` in place, pieces in parallel.
    pub fn open_all(&self, data: &mut [u8]) -> Result<()> {
        let total = self.pieces.last().map_or(0, |p| p.range.end);
        if data.len() != total {
            return Err(Error::value(format!("expected {total} bytes of tensor data, got {}", data.len())));
        }
        if self.pieces.len() == 1 {
            return self.open_piece(0, data);
        }
        let mut slices = Vec::with_capacity(self.pieces.len());
        let mut rest = data;
        for p in &self.pieces {
            let (head, tail) = rest.split_at_mut(p.range.len());
            slices.push(head);
            rest = tail;
        }
        slices
            .into_par_iter()
            .zip(self.pieces.par_iter())
            .try_for_each(|(chunk, p)| if self.cipher.open(&p.nonce, &p.mac, chunk) { Ok(()) } else { Err(()) })
            .map_err(|_| auth_failed())
    }
}

/// Decrypt `data` in place using the tensor's crypt info. Fails on any MAC mismatch with
/// [`AUTH_FAILED`]; empty data is left alone (no key is derived for it).
pub fn decrypt_tensor(keys: &DecryptionKeys, info: &CryptInfo, data: &mut [u8]) -> Result<()> {
    decrypt_tensor_until(keys, info, data, &|| false)
}

/// [`decrypt_tensor`], giving up once `stop()` says so while a key derivation runs.
pub fn decrypt_tensor_until(
    keys: &DecryptionKeys,
    info: &CryptInfo,
    data: &mut [u8],
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    match DecryptPlan::new_until(keys, info, data.len() as u64, stop)? {
        Some(plan) => plan.open_all(data),
        None => Ok(()),
    }
}

/// Seal `data` in place with nonces `nonce0 + i` per `CHUNK_SIZE` chunk, in parallel.
fn seal_chunks(key: &[u8; KEY_LEN], nonce0: &[u8; NONCE_LEN], data: &mut [u8]) -> Vec<[u8; MAC_LEN]> {
    let cipher = SecretBox::new(key);
    if data.len() <= CHUNK_SIZE {
        return vec![cipher.seal(nonce0, data)];
    }
    data.par_chunks_mut(CHUNK_SIZE)
        .enumerate()
        .map(|(i, chunk)| cipher.seal(&nonce_add(nonce0, i as u64), chunk))
        .collect()
}

fn crypt_info_for(keys: &EncryptionKeys, nonce: [u8; NONCE_LEN], macs: Vec<[u8; MAC_LEN]>) -> CryptInfo {
    let mut chunks = Vec::with_capacity(2);
    if let Some(p) = &keys.kdf {
        chunks.push(CryptChunk::Kdf(p.clone()));
    }
    chunks.push(CryptChunk::XSalsa20Parallel { chunk_size: CHUNK_SIZE as u64, nonce, macs });
    CryptInfo { chunks }
}

/// Encrypt `data` in place (the caller's own copy) and return the crypt info to store.
/// Empty data is not encrypted and gets a crypt info with no chunks (store it like a meta
/// tensor: CRC32 + SHA256).
pub fn encrypt_tensor(keys: &EncryptionKeys, data: &mut [u8]) -> Result<CryptInfo> {
    if data.is_empty() {
        return Ok(CryptInfo::default());
    }
    let nonce = random_nonce()?;
    let macs = seal_chunks(&keys.key, &nonce, data);
    Ok(crypt_info_for(keys, nonce, macs))
}

/// A file's encryption context: the keys plus every nonce used so far, so that no nonce is
/// ever used twice within the file (as tensorizer's writer guarantees). Share it by reference
/// between writer threads.
pub struct Encryptor {
    keys: EncryptionKeys,
    used: Mutex<HashSet<[u8; NONCE_LEN]>>,
}

impl fmt::Debug for Encryptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encryptor").field("keys", &self.keys).finish_non_exhaustive()
    }
}

impl Encryptor {
    pub fn new(keys: EncryptionKeys) -> Self {
        Encryptor { keys, used: Mutex::new(HashSet::new()) }
    }

    pub fn keys(&self) -> &EncryptionKeys {
        &self.keys
    }

    /// Draw a nonce whose whole run `n0 .. n0 + chunks` is unused in this file and reserve it.
    fn reserve_nonces(&self, chunks: u64) -> Result<[u8; NONCE_LEN]> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..16 {
            let n0 = random_nonce()?;
            if (0..chunks).all(|i| !used.contains(&nonce_add(&n0, i))) {
                used.extend((0..chunks).map(|i| nonce_add(&n0, i)));
                return Ok(n0);
            }
        }
        Err(Error::crypto("could not draw an unused nonce (the random number generator is broken)"))
    }

    /// Like [`encrypt_tensor`], refusing to reuse any chunk nonce already used in this file.
    pub fn encrypt(&self, data: &mut [u8]) -> Result<CryptInfo> {
        if data.is_empty() {
            return Ok(CryptInfo::default());
        }
        let chunks = data.len().div_ceil(CHUNK_SIZE) as u64;
        let nonce = self.reserve_nonces(chunks)?;
        let macs = seal_chunks(&self.keys.key, &nonce, data);
        Ok(crypt_info_for(&self.keys, nonce, macs))
    }
}

#[cfg(test)]
mod tests;
