//! CRC32 (zlib) and SHA-256 over the hashable header followed by the plaintext.
use sha2::{Digest, Sha256};

use super::record::{HASH_CRC32, HASH_SHA256};

pub struct RecordHasher {
    crc: Option<crc32fast::Hasher>,
    sha: Option<Sha256>,
}

impl RecordHasher {
    /// Start hashing for the given hash kinds, fed first with the hashable header.
    pub fn new(kinds: impl IntoIterator<Item = u8>, hashable_header: &[u8]) -> Self {
        let mut h = RecordHasher { crc: None, sha: None };
        for k in kinds {
            match k {
                HASH_CRC32 => h.crc = Some(crc32fast::Hasher::new()),
                HASH_SHA256 => h.sha = Some(Sha256::new()),
                _ => {}
            }
        }
        h.update(hashable_header);
        h
    }
    pub fn update(&mut self, data: &[u8]) {
        if let Some(c) = &mut self.crc {
            c.update(data);
        }
        if let Some(s) = &mut self.sha {
            s.update(data);
        }
    }
    /// The digest for `kind`, in its stored byte form.
    pub fn finish(self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(c) = self.crc {
            out.push((HASH_CRC32, c.finalize().to_le_bytes().to_vec()));
        }
        if let Some(s) = self.sha {
            out.push((HASH_SHA256, s.finalize().to_vec()));
        }
        out
    }
}
