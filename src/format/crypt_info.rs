//! The crypt-info block in each tensor header of an encrypted file: key-derivation
//! parameters and the XSalsa20-Poly1305 nonce and per-chunk MACs.
use super::cursor::Cursor;
use crate::error::{Error, Result};

pub const CHUNK_KDF: u16 = 1;
pub const CHUNK_XSALSA20_PARALLEL: u16 = 2;
pub const CHUNK_XSALSA20_SEQUENTIAL: u16 = 3;
pub const KDF_PWHASH: u16 = 1;
pub const NONCE_LEN: usize = 24;
pub const MAC_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PwHashParams {
    pub opslimit: u64,
    pub memlimit: u64,
    pub alg: i32,
    pub salt: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptChunk {
    Kdf(PwHashParams),
    /// Data cut into `chunk_size` pieces, each sealed with nonce `nonce + i` and `macs[i]`.
    XSalsa20Parallel {
        chunk_size: u64,
        nonce: [u8; NONCE_LEN],
        macs: Vec<[u8; MAC_LEN]>,
    },
    /// One secretbox over all the data (readable; CoreWeave never writes it).
    XSalsa20Sequential {
        nonce: [u8; NONCE_LEN],
        mac: [u8; MAC_LEN],
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CryptInfo {
    pub chunks: Vec<CryptChunk>,
}

impl CryptInfo {
    /// Parse the block body (after its u64 length).
    pub fn parse(body: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(body);
        let count = c.u16("crypt-info chunk count")?;
        let mut chunks = Vec::new();
        for _ in 0..count {
            let len = c.u64("crypt-info chunk length")?;
            if len > c.remaining() as u64 {
                return Err(Error::format("crypt-info chunk runs past the end of the block"));
            }
            let mut cc = Cursor::new(c.bytes(len as usize, "crypt-info chunk")?);
            let ty = cc.u16("crypt-info chunk type")?;
            chunks.push(match ty {
                CHUNK_KDF => {
                    let method = cc.u16("key derivation method")?;
                    if method != KDF_PWHASH {
                        return Err(Error::crypto(format!("unknown key derivation method {method}")));
                    }
                    let opslimit = cc.u64("opslimit")?;
                    let memlimit = cc.u64("memlimit")?;
                    let alg = cc.i32("pwhash algorithm")?;
                    let salt_len = cc.u16("salt length")? as usize;
                    let salt = cc.bytes(salt_len, "salt")?.to_vec();
                    CryptChunk::Kdf(PwHashParams { opslimit, memlimit, alg, salt })
                }
                CHUNK_XSALSA20_PARALLEL => {
                    let chunk_size = cc.u64("cipher chunk size")?;
                    let nonce = cc.array::<NONCE_LEN>("nonce")?;
                    let num_macs = cc.u64("MAC count")?;
                    if num_macs > (cc.remaining() / MAC_LEN) as u64 {
                        return Err(Error::format("crypt-info MAC count runs past the end of its chunk"));
                    }
                    let macs = (0..num_macs).map(|_| cc.array::<MAC_LEN>("MAC")).collect::<Result<Vec<_>>>()?;
                    if chunk_size < 1024 || chunk_size % 64 != 0 {
                        return Err(Error::format(format!("invalid cipher chunk size {chunk_size}")));
                    }
                    CryptChunk::XSalsa20Parallel { chunk_size, nonce, macs }
                }
                CHUNK_XSALSA20_SEQUENTIAL => {
                    let nonce = cc.array::<NONCE_LEN>("nonce")?;
                    let mac = cc.array::<MAC_LEN>("MAC")?;
                    CryptChunk::XSalsa20Sequential { nonce, mac }
                }
                other => return Err(Error::format(format!("unknown crypt-info chunk type {other}"))),
            });
        }
        Ok(CryptInfo { chunks })
    }

    /// Encode with the u64 length prefix, as stored in a tensor header.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = (self.chunks.len() as u16).to_le_bytes().to_vec();
        for ch in &self.chunks {
            let mut c = Vec::new();
            match ch {
                CryptChunk::Kdf(p) => {
                    c.extend_from_slice(&CHUNK_KDF.to_le_bytes());
                    c.extend_from_slice(&KDF_PWHASH.to_le_bytes());
                    c.extend_from_slice(&p.opslimit.to_le_bytes());
                    c.extend_from_slice(&p.memlimit.to_le_bytes());
                    c.extend_from_slice(&p.alg.to_le_bytes());
                    c.extend_from_slice(&(p.salt.len() as u16).to_le_bytes());
                    c.extend_from_slice(&p.salt);
                }
                CryptChunk::XSalsa20Parallel { chunk_size, nonce, macs } => {
                    c.extend_from_slice(&CHUNK_XSALSA20_PARALLEL.to_le_bytes());
                    c.extend_from_slice(&chunk_size.to_le_bytes());
                    c.extend_from_slice(nonce);
                    c.extend_from_slice(&(macs.len() as u64).to_le_bytes());
                    for m in macs {
                        c.extend_from_slice(m);
                    }
                }
                CryptChunk::XSalsa20Sequential { nonce, mac } => {
                    c.extend_from_slice(&CHUNK_XSALSA20_SEQUENTIAL.to_le_bytes());
                    c.extend_from_slice(nonce);
                    c.extend_from_slice(mac);
                }
            }
            body.extend_from_slice(&(c.len() as u64).to_le_bytes());
            body.extend_from_slice(&c);
        }
        let mut out = (body.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }

    pub fn kdf(&self) -> Option<&PwHashParams> {
        self.chunks.iter().find_map(|c| match c {
            CryptChunk::Kdf(p) => Some(p),
            _ => None,
        })
    }

    /// The one cipher chunk (type 2 or 3), if the tensor is encrypted.
    pub fn cipher(&self) -> Result<Option<&CryptChunk>> {
        let mut it = self.chunks.iter().filter(|c| !matches!(c, CryptChunk::Kdf(_)));
        let first = it.next();
        if it.next().is_some() {
            return Err(Error::format("crypt info holds more than one cipher chunk"));
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_spec() {
        let kdf = CryptChunk::Kdf(PwHashParams { opslimit: 3, memlimit: 1 << 28, alg: 2, salt: vec![7; 16] });
        let par = CryptChunk::XSalsa20Parallel { chunk_size: 2 << 20, nonce: [1; 24], macs: vec![[2; 16]; 3] };
        let info = CryptInfo { chunks: vec![kdf, par] };
        let enc = info.encode();
        // total_len = 2 + (8 + 42) + (8 + 42 + 16*3)
        assert_eq!(u64::from_le_bytes(enc[..8].try_into().unwrap()), 2 + 50 + 98);
        assert_eq!(CryptInfo::parse(&enc[8..]).unwrap(), info);
        assert_eq!(CryptInfo::default().encode(), vec![2, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
