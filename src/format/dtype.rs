//! Stored dtype strings: numpy's `dtype.str` (e.g. `<f4`) or, for torch types numpy lacks,
//! a same-width void type, NUL, and torch's name (e.g. `<V2\0torch.bfloat16`).
use crate::error::{Error, Result};

/// The numpy kind character of the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int,
    UInt,
    Float,
    Complex,
    /// `V`: raw bits, reinterpreted as a signed int container (and then as `torch_name`).
    Void,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DType {
    /// The exact stored bytes, kept for byte-exact rewrites and hashing.
    pub stored: Vec<u8>,
    pub kind: Kind,
    pub itemsize: usize,
    /// `torch.<name>` after the NUL, if any (without the `torch.` prefix).
    pub torch_name: Option<String>,
}

impl DType {
    pub fn parse(stored: &[u8]) -> Result<Self> {
        let bad =
            |why: &str| Error::format(format!("invalid dtype string {:?}: {why}", String::from_utf8_lossy(stored)));
        let mut parts = stored.splitn(2, |&b| b == 0);
        let left = parts.next().unwrap_or_default();
        let right = parts.next();
        if right.is_some_and(|r| r.contains(&0)) {
            return Err(bad("more than one NUL separator"));
        }
        if left.len() < 2 {
            return Err(bad("too short"));
        }
        let (order, rest) = match left[0] {
            b'<' | b'|' | b'=' => (left[0], &left[1..]),
            b'>' => return Err(bad("big-endian data is not supported")),
            _ => (b'=', left),
        };
        let kind = match rest[0] {
            b'b' => Kind::Bool,
            b'i' => Kind::Int,
            b'u' => Kind::UInt,
            b'f' => Kind::Float,
            b'c' => Kind::Complex,
            b'V' => Kind::Void,
            _ => return Err(bad("unknown numpy kind")),
        };
        let digits = std::str::from_utf8(&rest[1..]).map_err(|_| bad("item size is not ASCII"))?;
        let itemsize: usize = digits.parse().map_err(|_| bad("item size is not a number"))?;
        let ok = match kind {
            Kind::Bool => itemsize == 1,
            Kind::Int | Kind::UInt | Kind::Void => matches!(itemsize, 1 | 2 | 4 | 8),
            Kind::Float => matches!(itemsize, 2 | 4 | 8),
            Kind::Complex => matches!(itemsize, 8 | 16),
        };
        if !ok {
            return Err(bad("unsupported item size"));
        }
        let _ = order;
        let torch_name = match right {
            None => None,
            Some(r) => {
                let s = std::str::from_utf8(r).map_err(|_| bad("torch dtype name is not UTF-8"))?;
                let name = s.strip_prefix("torch.").ok_or_else(|| bad("opaque dtype name must start with 'torch.'"))?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(bad("invalid torch dtype name"));
                }
                Some(name.to_string())
            }
        };
        Ok(DType { stored: stored.to_vec(), kind, itemsize, torch_name })
    }

    /// True for dtypes numpy cannot represent (stored with a torch name).
    pub fn is_opaque(&self) -> bool {
        self.torch_name.is_some()
    }

    /// The numpy container string a reader uses: `V` becomes a signed int of the same width.
    pub fn container_str(&self) -> String {
        let left = self.stored.split(|&b| b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(left).replace('V', "i")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spec_string() {
        for (s, size, opaque) in [
            (&b"<f4"[..], 4, false),
            (b"|b1", 1, false),
            (b"<c16", 16, false),
            (b"<V2\0torch.bfloat16", 2, true),
            (b"|V1\0torch.float8_e4m3fn", 1, true),
            (b"<V4\0torch.complex32", 4, true),
        ] {
            let d = DType::parse(s).unwrap();
            assert_eq!(d.itemsize, size);
            assert_eq!(d.is_opaque(), opaque);
        }
        assert_eq!(DType::parse(b"<V2\0torch.bfloat16").unwrap().container_str(), "<i2");
        for bad in
            [&b""[..], b"<", b"<x4", b"<f3", b">f4", b"<V2\0bfloat16", b"<V2\0torch.a\0b", b"<f99999999999999999999"]
        {
            assert!(DType::parse(bad).is_err(), "{:?}", bad);
        }
    }
}
