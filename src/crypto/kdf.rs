//! Passphrase key derivation: libsodium `crypto_pwhash` with `ALG_ARGON2ID13`, i.e. Argon2id
//! v0x13 with `t_cost = opslimit`, `m_cost = memlimit / 1024` KiB, one lane and a 32-byte output.
//!
//! Derived keys are cached process-wide by `(passphrase, opslimit, memlimit, alg, salt)`, so a
//! file whose tensors all carry the same parameters derives once, even when several reader
//! threads ask at the same moment (the others wait for the first).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use argon2::{Algorithm, Argon2, Block, Params, Version};
use zeroize::{Zeroize, Zeroizing};

use super::KEY_LEN;
use crate::error::{Error, Result};
use crate::format::crypt_info::PwHashParams;

/// libsodium's `crypto_pwhash_ALG_ARGON2ID13`: the only algorithm tensorizer uses.
pub const ALG_ARGON2ID13: i32 = 2;
/// `crypto_pwhash_SALTBYTES`.
pub const SALT_LEN: usize = 16;
/// `crypto_pwhash_argon2id_OPSLIMIT_MIN` / `_MAX`.
pub const OPSLIMIT_MIN: u64 = 1;
pub const OPSLIMIT_MAX: u64 = u32::MAX as u64;
/// `crypto_pwhash_argon2id_MEMLIMIT_MIN` / `_MAX` (64-bit builds).
pub const MEMLIMIT_MIN: u64 = 8192;
pub const MEMLIMIT_MAX: u64 = 4_398_046_510_080;

/// libsodium 1.0.18 presets (`OpsLimit`/`MemLimit` in tensorizer's `EncryptionParams`).
pub const OPSLIMIT_INTERACTIVE: u64 = 2;
pub const OPSLIMIT_MODERATE: u64 = 3;
pub const OPSLIMIT_SENSITIVE: u64 = 4;
pub const MEMLIMIT_INTERACTIVE: u64 = 64 << 20;
pub const MEMLIMIT_MODERATE: u64 = 256 << 20;
pub const MEMLIMIT_SENSITIVE: u64 = 1 << 30;

/// Check that stored (or requested) parameters are ones libsodium would accept.
pub fn validate_params(p: &PwHashParams) -> Result<()> {
    if p.alg != ALG_ARGON2ID13 {
        return Err(Error::crypto(format!(
            "unsupported password hashing algorithm {} (only {ALG_ARGON2ID13}, Argon2id v1.3, is known)",
            p.alg
        )));
    }
    if p.salt.len() != SALT_LEN {
        return Err(Error::crypto(format!("key derivation salt is {} bytes, expected {SALT_LEN}", p.salt.len())));
    }
    if !(OPSLIMIT_MIN..=OPSLIMIT_MAX).contains(&p.opslimit) {
        return Err(Error::crypto(format!(
            "key derivation opslimit {} is outside {OPSLIMIT_MIN}..={OPSLIMIT_MAX}",
            p.opslimit
        )));
    }
    if !(MEMLIMIT_MIN..=MEMLIMIT_MAX).contains(&p.memlimit) {
        return Err(Error::crypto(format!(
            "key derivation memlimit {} is outside {MEMLIMIT_MIN}..={MEMLIMIT_MAX}",
            p.memlimit
        )));
    }
    Ok(())
}

/// Derive a 32-byte key from `passphrase` exactly as libsodium `crypto_pwhash` does.
/// No caching: see [`derive_key_cached`].
pub fn derive_key(passphrase: &[u8], params: &PwHashParams) -> Result<[u8; KEY_LEN]> {
    if passphrase.is_empty() {
        return Err(Error::value("the passphrase must not be empty"));
    }
    validate_params(params)?;
    // Both fit u32 after validation (memlimit / 1024 <= 4294967295).
    let m_cost = (params.memlimit / 1024) as u32;
    let t_cost = params.opslimit as u32;
    let argon_params = Params::new(m_cost, t_cost, 1, Some(KEY_LEN))
        .map_err(|e| Error::crypto(format!("invalid key derivation parameters: {e}")))?;
    // Allocate the work area fallibly: a hostile header may ask for terabytes, and that must be
    // an error, not an abort.
    let blocks = argon_params.block_count();
    let mut memory: Vec<Block> = Vec::new();
    memory.try_reserve_exact(blocks).map_err(|_| {
        Error::crypto(format!("cannot allocate {} MiB for passphrase key derivation", (blocks as u64) / 1024))
    })?;
    memory.resize(blocks, Block::default());
    let mut out = [0u8; KEY_LEN];
    let result = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params).hash_password_into_with_memory(
        passphrase,
        &params.salt,
        &mut out,
        &mut memory[..],
    );
    // The work area holds material from which the key can be recomputed cheaply.
    for b in memory.iter_mut() {
        b.as_mut().zeroize();
    }
    result.map_err(|e| Error::crypto(format!("key derivation failed: {e}")))?;
    Ok(out)
}

#[derive(PartialEq, Eq, Hash)]
struct CacheKey {
    passphrase: Vec<u8>,
    opslimit: u64,
    memlimit: u64,
    alg: i32,
    salt: Vec<u8>,
}

impl Drop for CacheKey {
    fn drop(&mut self) {
        self.passphrase.zeroize();
    }
}

type Slot = Arc<Mutex<Option<Zeroizing<[u8; KEY_LEN]>>>>;

/// Entries kept before the cache is emptied (it only ever holds a handful in practice).
const CACHE_CAP: usize = 64;

fn cache() -> &'static Mutex<HashMap<CacheKey, Slot>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Slot>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// [`derive_key`], remembered per `(passphrase, opslimit, memlimit, alg, salt)`. Concurrent
/// callers with the same inputs wait for one derivation; failures are not cached.
pub fn derive_key_cached(passphrase: &[u8], params: &PwHashParams) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    if passphrase.is_empty() {
        return Err(Error::value("the passphrase must not be empty"));
    }
    validate_params(params)?;
    let key = CacheKey {
        passphrase: passphrase.to_vec(),
        opslimit: params.opslimit,
        memlimit: params.memlimit,
        alg: params.alg,
        salt: params.salt.clone(),
    };
    let slot = {
        let mut map = cache().lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= CACHE_CAP && !map.contains_key(&key) {
            map.clear();
        }
        map.entry(key).or_default().clone()
    };
    let mut guard = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(k) = guard.as_ref() {
        return Ok(k.clone());
    }
    let derived = Zeroizing::new(derive_key(passphrase, params)?);
    *guard = Some(derived.clone());
    Ok(derived)
}

/// Forget every cached derived key (e.g. when the caller is done with a model).
pub fn clear_key_cache() {
    cache().lock().unwrap_or_else(PoisonError::into_inner).clear();
}

#[cfg(test)]
pub(crate) fn cache_len() -> usize {
    cache().lock().unwrap_or_else(PoisonError::into_inner).len()
}
