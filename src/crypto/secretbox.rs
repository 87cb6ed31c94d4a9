//! libsodium `crypto_secretbox_detached` / `crypto_secretbox_open_detached` (XSalsa20-Poly1305,
//! no associated data) over one piece of data, in place, plus `sodium_increment` for nonces.
//!
//! The construction (the same as the `crypto_secretbox` crate, which the tests use as the
//! reference): `subkey = HSalsa20(key, nonce[..16])`; Salsa20 keystream block 0 under
//! `(subkey, nonce[16..])` gives the Poly1305 key in its first 32 bytes and encrypts the first 32
//! data bytes with its second half; data byte `j >= 32` uses keystream byte `j + 32`. The MAC is
//! Poly1305 over the ciphertext.
//!
//! Both directions run in one pass over the data, in slices that stay in L1/L2: encrypt then MAC
//! each slice, or MAC then decrypt it. Opening therefore decrypts before the tag is known; on a
//! bad tag the keystream is applied again, so the caller's data is left as it was.
use poly1305::universal_hash::{KeyInit, UniversalHash};
use poly1305::Poly1305;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::salsa::{hsalsa20, Salsa20};
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
        let mut le = [0u8; 8];
        le.copy_from_slice(limb);
        let (sum, overflow) = u64::from_le_bytes(le).overflowing_add(carry);
        limb.copy_from_slice(&sum.to_le_bytes());
        carry = overflow as u64;
    }
    out
}

/// Bytes handled per step of the single pass (a multiple of 64, small enough to stay cached
/// between the MAC and the XOR).
const SLICE: usize = 16 << 10;

/// A cipher instance for one key; cheap to share between threads (`&self` only).
pub struct SecretBox {
    key: Zeroizing<[u8; KEY_LEN]>,
}

/// The per-message state: the keystream and the first keystream block.
struct Message {
    stream: Salsa20,
    block0: Zeroizing<[u8; 64]>,
}

impl Message {
    fn new(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN]) -> Self {
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&nonce[..16]);
        let mut suffix = [0u8; 8];
        suffix.copy_from_slice(&nonce[16..]);
        let subkey = Zeroizing::new(hsalsa20(key, &prefix));
        let stream = Salsa20::new(&subkey, &suffix);
        let block0 = Zeroizing::new(stream.block(0));
        Message { stream, block0 }
    }

    fn mac(&self) -> Poly1305 {
        Poly1305::new(self.block0[..32].into())
    }

    /// XOR `data` (the message from byte `offset`, a multiple of 64 or 0..32) with its keystream.
    fn xor(&self, offset: usize, data: &mut [u8]) {
        if offset == 0 {
            let head = data.len().min(32);
            let (a, b) = data.split_at_mut(head);
            a.iter_mut().zip(&self.block0[32..]).for_each(|(d, k)| *d ^= k);
            if !b.is_empty() {
                self.stream.xor_at(1, b);
            }
        } else {
            // Byte `offset` of the message is keystream byte `offset + 32`, i.e. block
            // (offset + 32) / 64 at position 32: keep the 64-byte alignment by splitting.
            debug_assert!(offset >= 32 && (offset - 32) % 64 == 0);
            self.stream.xor_at(((offset + 32) / 64) as u64, data);
        }
    }

    /// The slices `[start, end)` of a message of `len` bytes: 0..32, then runs of `SLICE`.
    fn slices(len: usize) -> impl Iterator<Item = (usize, usize)> {
        let first = len.min(32);
        std::iter::once((0, first))
            .chain((first..len).step_by(SLICE).map(move |s| (s, (s + SLICE).min(len))))
            .filter(move |(s, e)| s < e || len == 0)
    }
}

/// Feed `data` to the MAC; `last` says whether it ends the message (then the tag is returned).
fn mac_update(mac: &mut Option<Poly1305>, data: &[u8], last: bool) -> Option<[u8; MAC_LEN]> {
    let m = mac.as_mut()?;
    if !last {
        // Every slice but the last is a multiple of 16 bytes long: plain blocks.
        m.update_padded(data);
        return None;
    }
    let full = data.len() / 16 * 16;
    m.update_padded(&data[..full]);
    let tag = mac.take()?.compute_unpadded(&data[full..]);
    Some(tag.into())
}

impl SecretBox {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        SecretBox { key: Zeroizing::new(*key) }
    }

    /// Encrypt `data` in place and return its MAC.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], data: &mut [u8]) -> [u8; MAC_LEN] {
        let msg = Message::new(&self.key, nonce);
        let mut mac = Some(msg.mac());
        let len = data.len();
        let mut tag = [0u8; MAC_LEN];
        for (s, e) in Message::slices(len) {
            let piece = &mut data[s..e];
            msg.xor(s, piece);
            if let Some(t) = mac_update(&mut mac, piece, e == len) {
                tag = t;
            }
        }
        tag
    }

    /// Verify `mac` over the ciphertext in `data` and decrypt it in place. On failure `data` is
    /// left as it was and `false` is returned.
    #[must_use]
    pub fn open(&self, nonce: &[u8; NONCE_LEN], mac: &[u8; MAC_LEN], data: &mut [u8]) -> bool {
        let msg = Message::new(&self.key, nonce);
        let mut poly = Some(msg.mac());
        let len = data.len();
        let mut tag = [0u8; MAC_LEN];
        for (s, e) in Message::slices(len) {
            let piece = &mut data[s..e];
            if let Some(t) = mac_update(&mut poly, piece, e == len) {
                tag = t;
            }
            msg.xor(s, piece);
        }
        if bool::from(tag.ct_eq(mac)) {
            true
        } else {
            // Put the ciphertext back: XOR with the same keystream undoes the decryption.
            for (s, e) in Message::slices(len) {
                msg.xor(s, &mut data[s..e]);
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crypto_secretbox::aead::generic_array::GenericArray;
    use crypto_secretbox::aead::AeadInPlace;
    use crypto_secretbox::XSalsa20Poly1305;

    #[test]
    fn matches_the_crypto_secretbox_crate() {
        let key: [u8; 32] = std::array::from_fn(|i| (i * 41 + 7) as u8);
        let reference = XSalsa20Poly1305::new(GenericArray::from_slice(&key));
        let ours = SecretBox::new(&key);
        let plain: Vec<u8> = (0..3 * SLICE + 1000).map(|i| (i * 17 + (i >> 9)) as u8).collect();
        let lens = [
            0,
            1,
            15,
            16,
            17,
            31,
            32,
            33,
            63,
            64,
            95,
            96,
            97,
            100,
            511,
            512,
            544,
            1000,
            SLICE - 1,
            SLICE,
            SLICE + 31,
            SLICE + 32,
            SLICE + 33,
            3 * SLICE + 1000,
        ];
        for (n, len) in lens.into_iter().enumerate() {
            let nonce: [u8; 24] = std::array::from_fn(|i| (i * 5 + n) as u8);
            let mut want = plain[..len].to_vec();
            let want_tag =
                reference.encrypt_in_place_detached(GenericArray::from_slice(&nonce), b"", &mut want).unwrap();
            let mut got = plain[..len].to_vec();
            let tag = ours.seal(&nonce, &mut got);
            assert!(got == want, "len {len}: ciphertext");
            assert_eq!(&tag[..], want_tag.as_slice(), "len {len}: tag");
            assert!(ours.open(&nonce, &tag, &mut got), "len {len}: open");
            assert!(got == plain[..len], "len {len}: round trip");
            // A wrong tag leaves the ciphertext untouched.
            let mut bad = want.clone();
            let mut wrong = tag;
            wrong[0] ^= 1;
            assert!(!ours.open(&nonce, &wrong, &mut bad));
            assert!(bad == want, "len {len}: data restored after a failed open");
        }
    }

    #[test]
    fn random_cases_match_the_crypto_secretbox_crate() {
        // xorshift64*: deterministic, no extra dependency.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for case in 0..150 {
            let key: [u8; 32] = std::array::from_fn(|_| next() as u8);
            let nonce: [u8; 24] = std::array::from_fn(|_| next() as u8);
            let len = match case % 3 {
                0 => (next() % 200) as usize,
                1 => (next() % 5000) as usize,
                _ => (next() % (3 * SLICE as u64)) as usize,
            };
            let plain: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let reference = XSalsa20Poly1305::new(GenericArray::from_slice(&key));
            let mut want = plain.clone();
            let want_tag =
                reference.encrypt_in_place_detached(GenericArray::from_slice(&nonce), b"", &mut want).unwrap();
            let ours = SecretBox::new(&key);
            let mut got = plain.clone();
            let tag = ours.seal(&nonce, &mut got);
            assert!(got == want && tag[..] == want_tag[..], "case {case}, len {len}");
            assert!(ours.open(&nonce, &tag, &mut got), "case {case}, len {len}");
            assert!(got == plain, "case {case}, len {len}");
        }
    }
}
