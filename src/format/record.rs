//! The per-tensor record header that precedes each tensor's data.
use std::ops::Range;

use super::crypt_info::CryptInfo;
use super::cursor::Cursor;
use super::dtype::DType;
use crate::error::{Error, Result};

pub const HASH_CRC32: u8 = 0;
pub const HASH_SHA256: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHash {
    pub kind: u8,
    pub value: Vec<u8>,
    /// Where the value sits inside the header bytes (zeroed before hashing).
    pub at: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct TensorHeader {
    pub module_idx: u16,
    pub tensor_type: u8,
    pub name: Vec<u8>,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub hashes: Vec<StoredHash>,
    /// Span of the crypt-info block (with its u64 length) inside the header bytes.
    pub crypt_span: Option<Range<usize>>,
    pub crypt: Option<CryptInfo>,
    pub data_length: i64,
}

impl TensorHeader {
    /// Parse a whole header (`header_len` bytes, starting with `header_len` itself).
    pub fn parse(buf: &[u8], wide_shape: bool, has_crypt: bool) -> Result<Self> {
        let mut c = Cursor::new(buf);
        let header_len = c.u64("header length")?;
        if header_len != buf.len() as u64 {
            return Err(Error::format(format!(
                "tensor header length {header_len} disagrees with the metadata index ({} bytes)",
                buf.len()
            )));
        }
        if buf.len() < 8 + 2 + 1 + 2 + 1 + 1 + 2 + 8 {
            return Err(Error::format("tensor header is too short"));
        }
        let module_idx = c.u16("module index")?;
        let tensor_type = c.u8("tensor type")?;
        let name_len = c.u16("name length")? as usize;
        let name = c.bytes(name_len, "name")?.to_vec();
        let dtype_len = c.u8("dtype length")? as usize;
        let dtype = DType::parse(c.bytes(dtype_len, "dtype")?)?;
        let ndim = c.u8("ndim")? as usize;
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(if wide_shape { c.u64("shape")? } else { c.u32("shape")? as u64 });
        }
        let section_len = c.u16("hash section length")? as usize;
        let section_start = c.pos();
        let section = c.bytes(section_len, "hash section")?;
        let mut hc = Cursor::new(section);
        let count = hc.u8("hash count")?;
        let mut hashes = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let kind = hc.u8("hash type")?;
            let len = hc.u8("hash length")? as usize;
            let start = section_start + hc.pos();
            let value = hc.bytes(len, "hash value")?.to_vec();
            let expected = match kind {
                HASH_CRC32 => 4,
                HASH_SHA256 => 32,
                other => return Err(Error::format(format!("unknown hash type {other}"))),
            };
            if len != expected {
                return Err(Error::format(format!("hash type {kind} has length {len}, expected {expected}")));
            }
            hashes.push(StoredHash { kind, value, at: start..start + len });
        }
        let (crypt_span, crypt) = if has_crypt {
            let start = c.pos();
            let len = c.u64("crypt-info length")?;
            if len > c.remaining().saturating_sub(8) as u64 {
                return Err(Error::format("crypt-info block runs past the end of the tensor header"));
            }
            let body = c.bytes(len as usize, "crypt-info block")?;
            (Some(start..c.pos()), Some(CryptInfo::parse(body)?))
        } else {
            (None, None)
        };
        if c.remaining() < 8 {
            return Err(Error::format("tensor header has no room for its data length"));
        }
        // CoreWeave's reader takes the data length from the header's last 8 bytes.
        let data_length = i64::from_le_bytes(buf[buf.len() - 8..].try_into().expect("8 bytes"));
        if data_length < 0 {
            return Err(Error::format(format!(
                "negative data length {data_length} (compressed tensors are not supported)"
            )));
        }
        Ok(TensorHeader { module_idx, tensor_type, name, dtype, shape, hashes, crypt_span, crypt, data_length })
    }

    /// The bytes the stored hashes cover: the header with hash values zeroed and the
    /// crypt-info block cut out.
    pub fn hashable(&self, buf: &[u8]) -> Vec<u8> {
        hashable_bytes(buf, self.hashes.iter().map(|h| h.at.clone()), self.crypt_span.clone())
    }
}

pub fn hashable_bytes(
    buf: &[u8],
    hash_spans: impl Iterator<Item = Range<usize>>,
    crypt: Option<Range<usize>>,
) -> Vec<u8> {
    let mut copy = buf.to_vec();
    for r in hash_spans {
        copy[r].fill(0);
    }
    if let Some(r) = crypt {
        copy.drain(r);
    }
    copy
}

/// A freshly encoded header with zeroed hash values, and where to put them later.
pub struct EncodedHeader {
    pub bytes: Vec<u8>,
    pub hash_spans: Vec<(u8, Range<usize>)>,
    pub crypt_span: Option<Range<usize>>,
}

pub struct HeaderFields<'a> {
    pub module_idx: u16,
    pub tensor_type: u8,
    pub name: &'a [u8],
    pub dtype: &'a [u8],
    pub shape: &'a [u64],
    pub wide_shape: bool,
    /// Hash kinds in order (CoreWeave: CRC32 then SHA256; SHA256 only for encrypted data).
    pub hash_kinds: &'a [u8],
    /// The encoded crypt-info block (with its length prefix), in files that carry one.
    pub crypt: Option<&'a [u8]>,
    pub data_length: u64,
}

impl HeaderFields<'_> {
    pub fn encode(&self) -> EncodedHeader {
        let mut b = vec![0u8; 8];
        b.extend_from_slice(&self.module_idx.to_le_bytes());
        b.push(self.tensor_type);
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(self.name);
        b.push(self.dtype.len() as u8);
        b.extend_from_slice(self.dtype);
        b.push(self.shape.len() as u8);
        for &d in self.shape {
            if self.wide_shape {
                b.extend_from_slice(&d.to_le_bytes());
            } else {
                b.extend_from_slice(&(d as u32).to_le_bytes());
            }
        }
        let section_len: usize = 1 + self.hash_kinds.iter().map(|&k| 2 + hash_len(k)).sum::<usize>();
        b.extend_from_slice(&(section_len as u16).to_le_bytes());
        b.push(self.hash_kinds.len() as u8);
        let mut hash_spans = Vec::new();
        for &k in self.hash_kinds {
            b.push(k);
            b.push(hash_len(k) as u8);
            hash_spans.push((k, b.len()..b.len() + hash_len(k)));
            b.resize(b.len() + hash_len(k), 0);
        }
        let crypt_span = self.crypt.map(|c| {
            let start = b.len();
            b.extend_from_slice(c);
            start..b.len()
        });
        b.extend_from_slice(&(self.data_length as i64).to_le_bytes());
        let len = b.len() as u64;
        b[..8].copy_from_slice(&len.to_le_bytes());
        EncodedHeader { bytes: b, hash_spans, crypt_span }
    }
}

pub fn hash_len(kind: u8) -> usize {
    if kind == HASH_CRC32 {
        4
    } else {
        32
    }
}
