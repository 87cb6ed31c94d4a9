//! libsodium `crypto_secretbox_detached` / `crypto_secretbox_open_detached` (XSalsa20-Poly1305,
//! no associated data) over one piece of data, in place, plus `sodium_increment` for nonces.
use crypto_secretbox::aead::generic_array::GenericArray;
use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use crypto_secretbox::XSalsa20Poly1305;

use super::{KEY_LEN, MAC_LEN, NONCE_LEN};

/// `n0 + i` with the nonce read as a 192-bit little-endian integer, wrapping mod 2^192
/// (libsodium `sodium_increment` applied `i` times).
pub fn nonce_add(n0: &[u8; NONCE_LEN], i: u64) -> [u8; NONCE_LEN] {
    let mut out = *n0;
    let mut carry = i;
    for limb in out.chunks_exact_mut(8) {
        if carry == 0 {
            break;
        }
        let v = u64::from_le_bytes(limb.try_into().expect("8-byte limb"));
        let (sum, overflow) = v.overflowing_add(carry);
        limb.copy_from_slice(&sum.to_le_bytes());
        carry = overflow as u64;
    }
    out
}

/// A cipher instance for one key; cheap to share between threads (`&self` only).
pub struct SecretBox {
    inner: XSalsa20Poly1305,
}

impl SecretBox {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        SecretBox {
            inner: XSalsa20Poly1305::new(GenericArray::from_slice(key)),
        }
    }

    /// Encrypt `data` in place and return its MAC.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], data: &mut [u8]) -> [u8; MAC_LEN] {
        let tag = self
            .inner
            .encrypt_in_place_detached(GenericArray::from_slice(nonce), b"", data)
            .expect("secretbox without associated data cannot fail");
        tag.into()
    }

    /// Verify `mac` over the ciphertext in `data` and decrypt it in place. On failure `data` is
    /// left untouched and `false` is returned.
    #[must_use]
    pub fn open(&self, nonce: &[u8; NONCE_LEN], mac: &[u8; MAC_LEN], data: &mut [u8]) -> bool {
        self.inner
            .decrypt_in_place_detached(
                GenericArray::from_slice(nonce),
                b"",
                data,
                GenericArray::from_slice(mac),
            )
            .is_ok()
    }
}
