//! The metadata index: one entry per tensor (name, type, dtype, shape, offsets).
use super::cursor::Cursor;
use super::dtype::DType;
use crate::error::{Error, Result};

/// Smallest possible unversioned entry (empty name, 2-byte dtype, no dims): bounds the count.
const MIN_ENTRY_LEN: u64 = 2 + 1 + 1 + 2 + 1 + 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: Vec<u8>,
    pub tensor_type: u8,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub header_offset: u64,
    pub data_offset: u64,
    pub data_length: u64,
    /// 1 = u32 shape; 5 = u64 shape (only in files with versioned entries).
    pub entry_version: u32,
}

impl IndexEntry {
    /// Elements × item size, or an error if that overflows (a lying shape).
    pub fn expected_nbytes(&self) -> Result<u64> {
        expected_nbytes(&self.shape, self.dtype.itemsize)
    }
    pub fn wide_shape(&self) -> bool {
        self.entry_version == 5
    }
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
    /// Serialized length of this entry, given whether entries carry a version tag.
    pub fn encoded_len(&self, versioned: bool) -> usize {
        let dim = if self.wide_shape() { 8 } else { 4 };
        (if versioned { 4 } else { 0 })
            + 2
            + self.name.len()
            + 1
            + 1
            + self.dtype.stored.len()
            + 1
            + dim * self.shape.len()
            + 24
    }
    pub fn encode(&self, versioned: bool, out: &mut Vec<u8>) {
        if versioned {
            out.extend_from_slice(&self.entry_version.to_le_bytes());
        }
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.name);
        out.push(self.tensor_type);
        out.push(self.dtype.stored.len() as u8);
        out.extend_from_slice(&self.dtype.stored);
        out.push(self.shape.len() as u8);
        for &d in &self.shape {
            if self.wide_shape() {
                out.extend_from_slice(&d.to_le_bytes());
            } else {
                out.extend_from_slice(&(d as u32).to_le_bytes());
            }
        }
        out.extend_from_slice(&self.header_offset.to_le_bytes());
        out.extend_from_slice(&self.data_offset.to_le_bytes());
        out.extend_from_slice(&self.data_length.to_le_bytes());
    }
}

pub fn expected_nbytes(shape: &[u64], itemsize: usize) -> Result<u64> {
    shape
        .iter()
        .try_fold(itemsize as u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::format(format!("shape {shape:?} is too large (its byte size overflows 64 bits)")))
}

/// Parse exactly `count` entries from the index bytes, ignoring the padding after them.
pub fn parse_index(buf: &[u8], count: u64, versioned: bool) -> Result<Vec<IndexEntry>> {
    parse_index_used(buf, count, versioned).map(|(entries, _)| entries)
}

/// [`parse_index`], also returning how many bytes the entries took (the rest is padding).
pub fn parse_index_used(buf: &[u8], count: u64, versioned: bool) -> Result<(Vec<IndexEntry>, usize)> {
    if count > buf.len() as u64 / MIN_ENTRY_LEN + 1 {
        return Err(Error::format(format!(
            "header claims {count} tensors, more than a {}-byte metadata index can hold",
            buf.len()
        )));
    }
    let mut c = Cursor::new(buf);
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count {
        let ctx = |e: Error| Error::format(format!("metadata index entry {i}: {}", e.message));
        let entry_version = if versioned { c.u32("entry version").map_err(ctx)? } else { 1 };
        if entry_version != 1 && entry_version != 5 {
            return Err(Error::format(format!("metadata index entry {i}: unknown entry version {entry_version}")));
        }
        let name_len = c.u16("name length").map_err(ctx)? as usize;
        let name = c.bytes(name_len, "name").map_err(ctx)?.to_vec();
        let tensor_type = c.u8("tensor type").map_err(ctx)?;
        let dtype_len = c.u8("dtype length").map_err(ctx)? as usize;
        let dtype_bytes = c.bytes(dtype_len, "dtype").map_err(ctx)?;
        let ndim = c.u8("ndim").map_err(ctx)? as usize;
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(if entry_version == 5 {
                c.u64("shape").map_err(ctx)?
            } else {
                c.u32("shape").map_err(ctx)? as u64
            });
        }
        let header_offset = c.u64("header offset").map_err(ctx)?;
        let data_offset = c.u64("data offset").map_err(ctx)?;
        let data_length = c.u64("data length").map_err(ctx)?;
        let name_str = String::from_utf8_lossy(&name).into_owned();
        if tensor_type > 2 {
            return Err(Error::format(format!("unknown tensor type {tensor_type}")).in_tensor(&name_str));
        }
        let dtype = DType::parse(dtype_bytes).map_err(|e| e.in_tensor(&name_str))?;
        out.push(IndexEntry {
            name,
            tensor_type,
            dtype,
            shape,
            header_offset,
            data_offset,
            data_length,
            entry_version,
        });
    }
    Ok((out, c.pos()))
}
