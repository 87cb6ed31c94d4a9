//! Passphrase key derivation: libsodium `crypto_pwhash` with `ALG_ARGON2ID13`, i.e. Argon2id
//! v0x13 with `t_cost = opslimit`, `m_cost = memlimit / 1024` KiB, one lane and a 32-byte output.
//!
//! Derived keys are cached process-wide by `(passphrase, opslimit, memlimit, alg, salt)`, so a
//! file whose tensors all carry the same parameters derives once, even when several reader
//! threads ask at the same moment (the others wait for the first).
//!
//! Parameters read from a file are untrusted: [`KdfLimits`] bounds the memory and work they may
//! ask for before any is spent, and a caller waiting for a derivation can give up (Ctrl-C, a
//! failed load) while the one Argon2 call, which cannot be interrupted, finishes on its own
//! thread.
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

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

/// How much key derivation a file may ask for. A file may ask for at most `max_memlimit` bytes
/// and at most the work of `max_opslimit` passes over `max_memlimit` bytes
/// (`opslimit × memlimit ≤ max_opslimit × max_memlimit`), so a file with less memory may take
/// more passes. The default is the costliest preset libsodium documents and CoreWeave's
/// `EncryptionParams` offers, SENSITIVE/SENSITIVE (4 passes over 1 GiB: about 3.5 s on
/// libsodium's reference machine, 6 s on a 2-core EPYC); every preset combination fits. A file
/// made with more (it can say up to 2^32 − 1 passes over 4 TiB) needs the caller to raise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfLimits {
    pub max_opslimit: u64,
    pub max_memlimit: u64,
}

impl Default for KdfLimits {
    fn default() -> Self {
        KdfLimits { max_opslimit: OPSLIMIT_SENSITIVE, max_memlimit: MEMLIMIT_SENSITIVE }
    }
}

impl KdfLimits {
    /// Defaults for what is not given.
    pub fn new(max_opslimit: Option<u64>, max_memlimit: Option<u64>) -> Self {
        let d = KdfLimits::default();
        KdfLimits {
            max_opslimit: max_opslimit.unwrap_or(d.max_opslimit),
            max_memlimit: max_memlimit.unwrap_or(d.max_memlimit),
        }
    }

    /// Refuse parameters above the bound, before anything is allocated or computed.
    pub fn check(&self, p: &PwHashParams) -> Result<()> {
        let raise = "if the file is trusted, raise the bound with \
                     DecryptionParams.from_string(..., max_opslimit=..., max_memlimit=...)";
        if p.memlimit > self.max_memlimit {
            return Err(Error::crypto(format!(
                "key derivation memlimit {} bytes is above the bound of {} bytes; {raise}",
                p.memlimit, self.max_memlimit
            )));
        }
        let budget = u128::from(self.max_opslimit) * u128::from(self.max_memlimit);
        if u128::from(p.opslimit) * u128::from(p.memlimit.max(1)) > budget {
            let allowed = budget / u128::from(p.memlimit.max(1));
            return Err(Error::crypto(format!(
                "key derivation opslimit {} is above the bound: with memlimit {} at most {allowed} \
                 (the work of max_opslimit={} passes over max_memlimit={} bytes); {raise}",
                p.opslimit, p.memlimit, self.max_opslimit, self.max_memlimit
            )));
        }
        Ok(())
    }
}

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

/// One cached derivation: not started (or failed before), running on its own thread, or done.
#[derive(Default)]
enum State {
    #[default]
    Idle,
    Running,
    Ready(Zeroizing<[u8; KEY_LEN]>),
    Failed(Error),
}

#[derive(Default)]
struct Slot {
    state: Mutex<State>,
    done: Condvar,
}

type SlotRef = Arc<Slot>;

/// Entries kept before the cache is emptied (it only ever holds a handful in practice).
const CACHE_CAP: usize = 64;

/// How often a caller waiting for a derivation asks whether it should give up.
const STOP_POLL: Duration = Duration::from_millis(100);

fn cache() -> &'static Mutex<HashMap<CacheKey, SlotRef>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, SlotRef>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// [`derive_key`] for parameters read from a file, remembered per `(passphrase, opslimit,
/// memlimit, alg, salt)`. The parameters must be within `limits`. The derivation runs on its
/// own thread; the caller waits for it, giving up with an error as soon as `stop()` says so
/// (checked every 100 ms): the derivation then finishes unobserved and is cached. Concurrent
/// callers with the same inputs wait for one derivation; a failure reaches the callers waiting
/// for it, and a later caller tries again.
pub fn derive_key_cached(
    passphrase: &[u8],
    params: &PwHashParams,
    limits: &KdfLimits,
    stop: &dyn Fn() -> bool,
) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    if passphrase.is_empty() {
        return Err(Error::value("the passphrase must not be empty"));
    }
    validate_params(params)?;
    limits.check(params)?;
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
    let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
    let mut involved = false;
    loop {
        match &*state {
            State::Ready(k) => return Ok(k.clone()),
            State::Failed(e) if involved => return Err(e.clone()),
            State::Running => involved = true,
            State::Idle | State::Failed(_) => {
                *state = State::Running;
                involved = true;
                let (slot2, pw, p) = (Arc::clone(&slot), Zeroizing::new(passphrase.to_vec()), params.clone());
                let spawned = std::thread::Builder::new().name("tz-kdf".into()).spawn(move || {
                    let result = derive_key(&pw, &p);
                    *slot2.state.lock().unwrap_or_else(PoisonError::into_inner) = match result {
                        Ok(k) => State::Ready(Zeroizing::new(k)),
                        Err(e) => State::Failed(e),
                    };
                    slot2.done.notify_all();
                });
                if let Err(e) = spawned {
                    *state = State::Idle;
                    return Err(Error::io(format!("cannot start the key derivation thread: {e}")));
                }
            }
        }
        if stop() {
            return Err(Error::io("stopped: the load was stopped"));
        }
        state = slot.done.wait_timeout(state, STOP_POLL).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// Forget every cached derived key (e.g. when the caller is done with a model).
pub fn clear_key_cache() {
    cache().lock().unwrap_or_else(PoisonError::into_inner).clear();
}

#[cfg(test)]
pub(crate) fn cache_len() -> usize {
    cache().lock().unwrap_or_else(PoisonError::into_inner).len()
}
