//! Opening a `.tensors` file: the fixed header and the metadata index, validated against the
//! file size before anything is allocated from them.
use crate::error::{Error, Result};
use crate::format::header::{FileHeader, HEADER_LEN};
use crate::format::index::{parse_index_used, IndexEntry};
use crate::format::names::{self, PathRegistry, TensorPath};
use crate::format::TensorHeader;
use crate::storage::{Source, Stop};

/// Headers hold names, shapes, hashes and one 16-byte MAC per 2 MiB: 64 MiB covers any real tensor.
pub const MAX_TENSOR_HEADER_LEN: u64 = 64 << 20;
/// The writer ends a file with an 8-byte zero terminator after the last record; a tail this
/// short cannot hold a record, so it is not read.
const TERMINATOR_LEN: u64 = 8;
/// Zero padding after the last record that a reader accepts (read and checked); more bytes
/// there are data no index entry accounts for.
const MAX_TAIL_PADDING: u64 = 1 << 20;
/// Bytes of index padding checked per read.
const PADDING_CHUNK: u64 = 1 << 20;

pub struct TensorFile {
    source: Box<dyn Source>,
    pub header: FileHeader,
    pub entries: Vec<IndexEntry>,
    pub paths: Vec<TensorPath>,
}

impl TensorFile {
    pub fn open(source: Box<dyn Source>) -> Result<Self> {
        Self::open_until(source, Stop::never())
    }

    /// [`TensorFile::open`], giving up once `stop` is set (the index of a remote file may take
    /// more reads than the open's probe).
    pub fn open_until(source: Box<dyn Source>, stop: &Stop) -> Result<Self> {
        let name = source.describe().to_string();
        Self::open_inner(source, stop).map_err(|e| e.in_file(&name))
    }

    fn open_inner(source: Box<dyn Source>, stop: &Stop) -> Result<Self> {
        let size = source.size();
        let mut fixed = vec![0u8; HEADER_LEN.min(size as usize)];
        source.read(0, &mut fixed, stop)?;
        let header = FileHeader::parse(&fixed)?;
        let index_end = (HEADER_LEN as u64).checked_add(header.index_len).filter(|&e| e <= size).ok_or_else(|| {
            Error::format(format!(
                "metadata index length {} runs past the end of the file ({size} bytes): the file is truncated or corrupt",
                header.index_len
            ))
        })?;
        if header.tensor_count == 0 {
            return Err(Error::value("Tensor index in the file is empty"));
        }
        // The index is mostly padding: read a prefix and grow it only while the entries need
        // more, so a lying length never sizes an allocation by itself.
        let mut want = header.index_len.min(1 << 20);
        let (entries, padding) = loop {
            let mut index = vec![0u8; want as usize];
            source.read(HEADER_LEN as u64, &mut index, stop)?;
            match parse_index_used(&index, header.tensor_count, header.versioned_entries()) {
                Ok((entries, used)) => break (entries, (used, index)),
                Err(_) if want < header.index_len => want = header.index_len.min(want * 4),
                Err(e) => return Err(e),
            }
        };
        check_index_padding(source.as_ref(), &header, padding.0, &padding.1, stop)?;
        let mut registry = PathRegistry::default();
        let mut paths = Vec::with_capacity(entries.len());
        for e in &entries {
            let shown = e.name_lossy();
            check_entry(e, index_end, size).map_err(|err| err.in_tensor(&shown))?;
            let path = names::decode(&e.name).map_err(|err| err.in_tensor(&shown))?;
            if path.len() > 1 && e.tensor_type != crate::format::TYPE_STATE_DICT {
                return Err(Error::format("structured paths are only allowed for state-dict entries").in_tensor(&shown));
            }
            registry.register(&path)?;
            paths.push(path);
        }
        check_layout(source.as_ref(), &entries, index_end, size, stop)?;
        Ok(TensorFile { source, header, entries, paths })
    }

    pub fn source(&self) -> &dyn Source {
        self.source.as_ref()
    }
    pub fn name(&self) -> &str {
        self.source.describe()
    }
    pub fn size(&self) -> u64 {
        self.source.size()
    }

    /// Entry `i`'s record header, read and parsed, with its bytes (what
    /// [`TensorHeader::hashable`] reads); errors name the tensor and the file.
    pub fn record_header(&self, i: usize) -> Result<(Vec<u8>, TensorHeader)> {
        self.record_header_until(i, Stop::never())
    }

    /// [`TensorFile::record_header`], giving up once `stop` is set.
    pub fn record_header_until(&self, i: usize, stop: &Stop) -> Result<(Vec<u8>, TensorHeader)> {
        let e =
            self.entries.get(i).ok_or_else(|| Error::value(format!("no tensor at index {i}")).in_file(self.name()))?;
        let read = || -> Result<_> {
            let mut buf = vec![0u8; (e.data_offset - e.header_offset) as usize];
            self.source.read(e.header_offset, &mut buf, stop)?;
            let h = TensorHeader::parse(&buf, e.wide_shape(), self.header.has_crypt_info())?;
            Ok((buf, h))
        };
        read().map_err(|err| err.in_tensor(&e.name_lossy()).in_file(self.name()))
    }

    /// The file's bytes `offset..offset + len`, cut at its end.
    pub fn read_bytes(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size());
        let n = usize::try_from(end.saturating_sub(offset)).map_err(|_| Error::value("read too large"))?;
        let mut buf = vec![0u8; n];
        if n > 0 {
            self.source.read_at(offset, &mut buf).map_err(|e| e.in_file(self.name()))?;
        }
        Ok(buf)
    }
}

fn check_entry(e: &IndexEntry, index_end: u64, size: u64) -> Result<()> {
    let nbytes = e.expected_nbytes()?;
    if e.data_length != 0 && e.data_length != nbytes {
        return Err(Error::format(format!(
            "stored data length {} does not match its dtype and shape ({nbytes} bytes)",
            e.data_length
        )));
    }
    let header_len = e.data_offset.saturating_sub(e.header_offset);
    if e.header_offset < index_end || !(8..=MAX_TENSOR_HEADER_LEN).contains(&header_len) {
        return Err(Error::format(format!(
            "record offsets are invalid (header at {}, data at {})",
            e.header_offset, e.data_offset
        )));
    }
    match e.data_offset.checked_add(e.data_length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::format(format!(
            "data ({} bytes at offset {}) runs past the end of the file ({size} bytes): the file is truncated",
            e.data_length, e.data_offset
        ))),
    }
}

/// The index holds exactly the header's count of entries: the bytes after them (up to the
/// index length) are zero padding, as every writer leaves them. Entries past the count (a
/// lowered count, an interrupted writer) would otherwise be a silently shorter model.
/// `index` is the prefix already read; the rest is read in bounded pieces.
fn check_index_padding(source: &dyn Source, header: &FileHeader, used: usize, index: &[u8], stop: &Stop) -> Result<()> {
    let past = || {
        Error::format(format!(
            "the metadata index holds more than the header's {} tensors (non-zero bytes after entry {}): \
             the tensor count is wrong or the file is corrupt",
            header.tensor_count, header.tensor_count
        ))
    };
    if index[used.min(index.len())..].iter().any(|&b| b != 0) {
        return Err(past());
    }
    let mut at = index.len() as u64;
    let mut buf = Vec::new();
    while at < header.index_len {
        let n = (header.index_len - at).min(PADDING_CHUNK);
        buf.resize(n as usize, 0);
        source.read(HEADER_LEN as u64 + at, &mut buf, stop)?;
        if buf.iter().any(|&b| b != 0) {
            return Err(past());
        }
        at += n;
    }
    Ok(())
}

/// Records follow the index back to back, in index order or not, each exactly once, and the
/// file ends after the last one (with the writer's zero terminator, or zero padding): what
/// CoreWeave's writer (and ours) produce. Anything else holds bytes no entry accounts for, or
/// entries sharing bytes.
fn check_layout(source: &dyn Source, entries: &[IndexEntry], index_end: u64, size: u64, stop: &Stop) -> Result<()> {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries[i].header_offset);
    let mut end = index_end;
    for &i in &order {
        let e = &entries[i];
        if e.header_offset != end {
            let what = if e.header_offset > end { "a gap of unaccounted bytes" } else { "overlapping records" };
            return Err(Error::format(format!(
                "record offsets are invalid ({what}: the record starts at {}, the previous one ends at {end})",
                e.header_offset
            ))
            .in_tensor(&e.name_lossy()));
        }
        end = e.data_offset + e.data_length; // checked against the file size already
    }
    let tail = size - end;
    if tail <= TERMINATOR_LEN {
        return Ok(());
    }
    let extra = || {
        Error::format(format!(
            "{tail} bytes follow the last tensor: the file holds data its index does not list \
             (the tensor count is wrong or the file is corrupt)"
        ))
    };
    if tail > MAX_TAIL_PADDING {
        return Err(extra());
    }
    let mut buf = vec![0u8; tail as usize];
    source.read(end, &mut buf, stop)?;
    if buf.iter().any(|&b| b != 0) {
        return Err(extra());
    }
    Ok(())
}
