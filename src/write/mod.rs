//! Writing `.tensors` files byte-compatible with CoreWeave's `TensorSerializer`.
//!
//! Entries are declared first (`add`), which fixes every record's offset, so their data can
//! then be written in any order and from several threads (`write`). `finish` writes the file
//! header, the index and the terminator, then commits the sink atomically.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::crypto::{self, EncryptionKeys};
use crate::error::{Error, Result};
use crate::format::crypt_info::{CryptChunk, CryptInfo};
use crate::format::hash::RecordHasher;
use crate::format::header::{FileHeader, DEFAULT_INDEX_LEN, FLAG_ENCRYPTED, FLAG_VERSIONED_HEADERS, HEADER_LEN};
use crate::format::index::{expected_nbytes, IndexEntry};
use crate::format::names::{self, PathRegistry};
use crate::format::record::{hashable_bytes, HeaderFields, HASH_CRC32, HASH_SHA256};
use crate::format::DType;
use crate::storage::Sink;

const CIPHER_CHUNK: u64 = 2 << 20;

/// One tensor to declare.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub module_idx: u16,
    pub tensor_type: u8,
    pub name: Vec<u8>,
    pub dtype: Vec<u8>,
    pub shape: Vec<u64>,
    /// A meta tensor: recorded with its dtype and shape but no data (read back as zeros).
    pub meta: bool,
}

struct Record {
    entry: IndexEntry,
    module_idx: u16,
    header_len: u64,
    written: AtomicBool,
}

pub struct Writer {
    sink: Option<Box<dyn Sink>>,
    keys: Option<EncryptionKeys>,
    records: Vec<Record>,
    index_len: Option<u64>,
    next_offset: u64,
    total_data: AtomicU64,
    used_nonces: Mutex<std::collections::HashSet<[u8; 24]>>,
    paths: PathRegistry,
}

impl Writer {
    pub fn new(sink: Box<dyn Sink>, keys: Option<EncryptionKeys>) -> Self {
        Writer {
            sink: Some(sink),
            keys,
            records: Vec::new(),
            index_len: None,
            next_offset: 0,
            total_data: AtomicU64::new(0),
            used_nonces: Mutex::new(Default::default()),
            paths: PathRegistry::default(),
        }
    }

    pub fn name(&self) -> &str {
        self.sink.as_ref().map(|s| s.describe()).unwrap_or("<closed>")
    }

    fn sink(&self) -> Result<&dyn Sink> {
        self.sink.as_deref().ok_or_else(|| Error::value("the serializer is closed"))
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
    pub fn total_tensor_bytes(&self) -> u64 {
        self.total_data.load(Ordering::Relaxed)
    }

    fn versioned(&self, extra: &[IndexEntry]) -> bool {
        self.records.iter().map(|r| &r.entry).chain(extra).any(|e| e.entry_version == 5)
    }

    /// Declare tensors; returns the slot of the first. The index is sized on the first call to
    /// hold everything declared then (CoreWeave's fixed 256 KiB when that suffices).
    pub fn add(&mut self, new: Vec<NewEntry>) -> Result<usize> {
        self.sink()?;
        let first = self.records.len();
        let mut prepared = Vec::with_capacity(new.len());
        for n in new {
            let shown = String::from_utf8_lossy(&n.name).into_owned();
            let module_idx = n.module_idx;
            let path = names::decode(&n.name).map_err(|e| e.in_tensor(&shown).in_file(self.name()))?;
            self.paths.register(&path).map_err(|e| e.in_file(self.name()))?;
            let (entry, header_len) = self.prepare(n).map_err(|e| e.in_tensor(&shown).in_file(self.name()))?;
            prepared.push((entry, header_len, module_idx));
        }
        let entries: Vec<IndexEntry> = prepared.iter().map(|(e, _, _)| e.clone()).collect();
        let versioned = self.versioned(&entries);
        let needed: u64 =
            self.records.iter().map(|r| &r.entry).chain(&entries).map(|e| e.encoded_len(versioned) as u64).sum();
        match self.index_len {
            Some(l) if needed <= l => {}
            Some(l) => {
                return Err(Error::value(format!(
                    "metadata index overflow: {needed} bytes needed, {l} reserved by the first write; \
                     write all tensors in one write_state_dict/write_module call"
                ))
                .in_file(self.name()))
            }
            None => {
                let l = if needed <= DEFAULT_INDEX_LEN {
                    DEFAULT_INDEX_LEN
                } else {
                    (needed * 5 / 4).div_ceil(DEFAULT_INDEX_LEN) * DEFAULT_INDEX_LEN
                };
                self.index_len = Some(l);
                self.next_offset = HEADER_LEN as u64 + l;
                // The header and index are rewritten at finish: sinks that upload as they go keep them.
                self.sink()?.set_header_len(self.next_offset).map_err(|e| e.in_file(self.name()))?;
            }
        }
        for (mut entry, header_len, module_idx) in prepared {
            entry.header_offset = self.next_offset;
            entry.data_offset = self.next_offset + header_len;
            self.next_offset = entry.data_offset + entry.data_length;
            self.records.push(Record { entry, module_idx, header_len, written: AtomicBool::new(false) });
        }
        Ok(first)
    }

    fn prepare(&self, n: NewEntry) -> Result<(IndexEntry, u64)> {
        if n.name.is_empty() {
            return Err(Error::value("Invalid empty tensor path"));
        }
        if n.name.len() > u16::MAX as usize {
            return Err(Error::value("tensor name is longer than 65535 bytes"));
        }
        if n.dtype.len() > u8::MAX as usize || n.shape.len() > u8::MAX as usize {
            return Err(Error::value("dtype string or number of dimensions is too long"));
        }
        let dtype = DType::parse(&n.dtype)?;
        let nbytes = expected_nbytes(&n.shape, dtype.itemsize)?;
        let data_length = if n.meta { 0 } else { nbytes };
        let wide = n.shape.iter().any(|&d| d > u32::MAX as u64);
        let entry = IndexEntry {
            name: n.name,
            tensor_type: n.tensor_type,
            dtype,
            shape: n.shape,
            header_offset: 0,
            data_offset: 0,
            data_length,
            entry_version: if wide { 5 } else { 1 },
        };
        let crypt = self.crypt_placeholder(data_length);
        let header = self.header_fields(&entry, 0, crypt.as_deref()).encode();
        Ok((entry, header.bytes.len() as u64))
    }

    fn hash_kinds(&self, data_length: u64) -> &'static [u8] {
        if self.keys.is_some() && data_length > 0 {
            &[HASH_SHA256]
        } else {
            &[HASH_CRC32, HASH_SHA256]
        }
    }

    /// A crypt-info block of the final size (zero nonce and MACs), to size the header.
    fn crypt_placeholder(&self, data_length: u64) -> Option<Vec<u8>> {
        let keys = self.keys.as_ref()?;
        if data_length == 0 {
            return Some(CryptInfo::default().encode());
        }
        let mut chunks = Vec::new();
        if let Some(kdf) = &keys.kdf {
            chunks.push(CryptChunk::Kdf(kdf.clone()));
        }
        chunks.push(CryptChunk::XSalsa20Parallel {
            chunk_size: CIPHER_CHUNK,
            nonce: [0; 24],
            macs: vec![[0; 16]; data_length.div_ceil(CIPHER_CHUNK) as usize],
        });
        Some(CryptInfo { chunks }.encode())
    }

    fn header_fields<'a>(&self, e: &'a IndexEntry, module_idx: u16, crypt: Option<&'a [u8]>) -> HeaderFields<'a> {
        HeaderFields {
            module_idx,
            tensor_type: e.tensor_type,
            name: &e.name,
            dtype: &e.dtype.stored,
            shape: &e.shape,
            wide_shape: e.entry_version == 5,
            hash_kinds: self.hash_kinds(e.data_length),
            crypt,
            data_length: e.data_length,
        }
    }

    /// Write one declared tensor's bytes (C-contiguous, little-endian). Meta tensors take `&[]`.
    /// Safe to call from several threads for different slots.
    pub fn write(&self, slot: usize, data: &[u8]) -> Result<()> {
        let r = self.records.get(slot).ok_or_else(|| Error::value(format!("no declared tensor {slot}")))?;
        let shown = r.entry.name_lossy();
        self.write_record(r, data).map_err(|e| e.in_tensor(&shown).in_file(self.name()))
    }

    fn write_record(&self, r: &Record, data: &[u8]) -> Result<()> {
        let e = &r.entry;
        if data.len() as u64 != e.data_length {
            return Err(Error::value(format!("expected {} bytes of data, got {}", e.data_length, data.len())));
        }
        if r.written.swap(true, Ordering::AcqRel) {
            return Err(Error::value("tensor written twice"));
        }
        let sink = self.sink()?;
        // Encrypt a private copy: the caller's tensor memory is never modified.
        let (crypt, payload) = match &self.keys {
            Some(keys) if !data.is_empty() => {
                let mut copy = data.to_vec();
                let info = crypto::encrypt_tensor(keys, &mut copy)?;
                self.check_nonce(&info)?;
                (Some(info.encode()), Some(copy))
            }
            Some(_) => (Some(CryptInfo::default().encode()), None),
            None => (None, None),
        };
        let enc = self.header_fields(e, r.module_idx, crypt.as_deref()).encode();
        if enc.bytes.len() as u64 != r.header_len {
            return Err(Error::value("internal error: tensor header size changed after layout"));
        }
        let mut header = enc.bytes;
        let mut hasher = RecordHasher::new(
            enc.hash_spans.iter().map(|(k, _)| *k),
            &hashable_bytes(&header, enc.hash_spans.iter().map(|(_, r)| r.clone()), enc.crypt_span.clone()),
        );
        hasher.update(data);
        for ((kind, digest), (k2, span)) in hasher.finish().into_iter().zip(&enc.hash_spans) {
            debug_assert_eq!(kind, *k2);
            header[span.clone()].copy_from_slice(&digest);
        }
        sink.write_at(e.header_offset, &header)?;
        sink.write_at(e.data_offset, payload.as_deref().unwrap_or(data))?;
        self.total_data.fetch_add(e.data_length, Ordering::Relaxed);
        Ok(())
    }

    fn check_nonce(&self, info: &CryptInfo) -> Result<()> {
        for c in &info.chunks {
            if let CryptChunk::XSalsa20Parallel { nonce, .. } = c {
                if !self.used_nonces.lock().unwrap_or_else(|p| p.into_inner()).insert(*nonce) {
                    return Err(Error::crypto("nonce reuse detected; refusing to write"));
                }
            }
        }
        Ok(())
    }

    /// The smallest data version covering what was written, and its flags.
    fn version_and_flags(&self) -> (u32, u8) {
        let entries = || self.records.iter().map(|r| &r.entry);
        let mut v = if self.keys.is_some() { 3 } else { 1 };
        if entries().any(|e| e.dtype.is_opaque()) {
            v = v.max(2);
        }
        if entries().any(|e| e.data_length == 0 && e.expected_nbytes().unwrap_or(0) > 0) {
            v = v.max(4);
        }
        let versioned = entries().any(|e| e.entry_version == 5);
        if versioned {
            v = v.max(5);
        }
        let mut flags = 0;
        if v >= 4 && self.keys.is_some() {
            flags |= FLAG_ENCRYPTED;
        }
        if versioned {
            flags |= FLAG_VERSIONED_HEADERS;
        }
        (v, flags)
    }

    /// Write header, index and terminator, and commit. Every declared tensor must be written.
    pub fn finish(&mut self) -> Result<()> {
        let name = self.name().to_string();
        if let Some(r) = self.records.iter().find(|r| !r.written.load(Ordering::Acquire)) {
            return Err(Error::value("declared but never written").in_tensor(&r.entry.name_lossy()).in_file(&name));
        }
        let sink = self.sink.take().ok_or_else(|| Error::value("the serializer is already closed"))?;
        let index_len = self.index_len.unwrap_or(DEFAULT_INDEX_LEN);
        if self.index_len.is_none() {
            self.next_offset = HEADER_LEN as u64 + index_len;
        }
        let (version, flags) = self.version_and_flags();
        let versioned = flags & FLAG_VERSIONED_HEADERS != 0;
        let header = FileHeader {
            version,
            flags,
            total_data_bytes: self.total_tensor_bytes(),
            tensor_count: self.records.len() as u64,
            index_len,
        };
        let mut head = header.encode().to_vec();
        for r in &self.records {
            r.entry.encode(versioned, &mut head);
        }
        head.resize(HEADER_LEN + index_len as usize, 0);
        sink.write_at(self.next_offset, &0u64.to_le_bytes()).map_err(|e| e.in_file(&name))?;
        sink.write_at(0, &head).map_err(|e| e.in_file(&name))?;
        sink.finish().map_err(|e| e.in_file(&name))
    }

    /// Drop everything written so far; nothing is left at the destination.
    pub fn abort(&mut self) {
        self.sink = None;
    }
}
