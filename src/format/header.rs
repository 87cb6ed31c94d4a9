//! The fixed 73-byte file header (magic, version, flags, sizes, index length).
use super::cursor::Cursor;
use crate::error::{Error, ErrorKind, Result};

pub const MAGIC: &[u8; 5] = b"|TZR|";
/// Bytes before the metadata index: magic + fixed fields + the u64 index length.
pub const HEADER_LEN: usize = 73;
/// CoreWeave's writer always reserves this many bytes for the index.
pub const DEFAULT_INDEX_LEN: u64 = 262_144;
pub const MAX_VERSION: u32 = 5;

pub const FLAG_ENCRYPTED: u8 = 1;
pub const FLAG_VERSIONED_HEADERS: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    pub version: u32,
    /// Feature flags; only bits 0 and 1 are defined, so a byte holds them.
    pub flags: u8,
    pub total_data_bytes: u64,
    pub tensor_count: u64,
    pub index_len: u64,
}

impl FileHeader {
    pub fn parse(buf: &[u8]) -> Result<Self> {
        if buf.len() < MAGIC.len() || &buf[..5] != MAGIC {
            return Err(Error::new(ErrorKind::NotTensorizer, "Not a tensorizer file (bad magic bytes)"));
        }
        if buf.len() < HEADER_LEN {
            return Err(Error::format(format!(
                "file is truncated: {} bytes, the file header alone needs {HEADER_LEN}",
                buf.len()
            )));
        }
        let mut c = Cursor::new(&buf[5..HEADER_LEN]);
        let version = c.u32("version")?;
        let flag_bytes = c.array::<32>("feature flags")?;
        let total_data_bytes = c.u64("total data size")?;
        c.bytes(8, "reserved field")?;
        let tensor_count = c.u64("tensor count")?;
        let index_len = c.u64("metadata index length")?;
        if !(1..=MAX_VERSION).contains(&version) {
            return Err(Error::new(
                ErrorKind::InvalidVersion,
                format!("Unsupported version: data version {version} (this reader knows 1 to {MAX_VERSION})"),
            ));
        }
        if flag_bytes[1..].iter().any(|&b| b != 0) || flag_bytes[0] >= 4 {
            return Err(Error::new(
                ErrorKind::InvalidVersion,
                "Unsupported feature flags (only bits 0 and 1 are defined)",
            ));
        }
        let flags = flag_bytes[0];
        if flags & FLAG_VERSIONED_HEADERS != 0 && version < 5 {
            return Err(Error::format(format!("versioned-headers flag set on a data version {version} file")));
        }
        Ok(FileHeader { version, flags, total_data_bytes, tensor_count, index_len })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..5].copy_from_slice(MAGIC);
        out[5..9].copy_from_slice(&self.version.to_le_bytes());
        out[9] = self.flags;
        out[41..49].copy_from_slice(&self.total_data_bytes.to_le_bytes());
        out[57..65].copy_from_slice(&self.tensor_count.to_le_bytes());
        out[65..73].copy_from_slice(&self.index_len.to_le_bytes());
        out
    }

    /// Crypt-info blocks exist in v3 files (whose flags are zero) and in v4+ files with bit 0.
    pub fn has_crypt_info(&self) -> bool {
        self.version == 3 || (self.version >= 4 && self.flags & FLAG_ENCRYPTED != 0)
    }

    pub fn versioned_entries(&self) -> bool {
        self.flags & FLAG_VERSIONED_HEADERS != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rules() {
        let h = FileHeader { version: 4, flags: 1, total_data_bytes: 8, tensor_count: 3, index_len: DEFAULT_INDEX_LEN };
        let b = h.encode();
        assert_eq!(FileHeader::parse(&b).unwrap(), h);
        assert!(h.has_crypt_info());
        let v3 = FileHeader { version: 3, flags: 0, ..h.clone() };
        assert!(FileHeader::parse(&v3.encode()).unwrap().has_crypt_info());
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(FileHeader::parse(&bad).unwrap_err().kind, ErrorKind::NotTensorizer);
        let mut v9 = b;
        v9[5] = 9;
        assert_eq!(FileHeader::parse(&v9).unwrap_err().kind, ErrorKind::InvalidVersion);
        let mut fl = b;
        fl[9] = 4;
        assert_eq!(FileHeader::parse(&fl).unwrap_err().kind, ErrorKind::InvalidVersion);
        assert_eq!(FileHeader::parse(&b[..40]).unwrap_err().kind, ErrorKind::Format);
    }
}
