//! Running a plan: reader threads pull items in file order, read into the tensors' own
//! buffers, and whoever finishes a tensor's last piece checks its header, decrypts and
//! verifies it.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::file::TensorFile;
use super::plan::{self, Item};
use crate::buffer::HostBuffer;
use crate::crypto::{self, DecryptionKeys};
use crate::error::{Error, ErrorKind, Result};
use crate::format::hash::RecordHasher;
use crate::format::{IndexEntry, TensorHeader};
use crate::storage::{reads_stop_on, SliceDest};

#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Parallel readers; `None` lets the source choose.
    pub num_readers: Option<usize>,
    pub verify_hash: bool,
    pub keys: Option<DecryptionKeys>,
}

pub struct LoadedTensor {
    pub entry: usize,
    pub module_idx: u16,
    pub data: HostBuffer,
}

struct Slot {
    entry: usize,
    dest: *mut u8,
    header: Mutex<Vec<u8>>,
    remaining: AtomicUsize,
    module_idx: Mutex<u16>,
}

// Slots are shared by reader threads; each writes a disjoint byte range of `dest`.
unsafe impl Sync for Slot {}

/// Check that the keys fit the file before any data is read.
pub fn check_keys(file: &TensorFile, keys: Option<&DecryptionKeys>) -> Result<()> {
    match (file.header.has_crypt_info(), keys.is_some()) {
        (true, false) => Err(Error::crypto(
            "the file is encrypted, but no decryption key was given (pass encryption=DecryptionParams...)",
        )),
        (false, true) => Err(Error::crypto("decryption was requested, but the file is not encrypted")),
        _ => Ok(()),
    }
    .map_err(|e| e.in_file(file.name()))
}

/// `opts` with hash verification turned on, when the caller left it off and the source cannot
/// pin one version of the object (no strong validator: see [`crate::storage::Source::pins_version`]):
/// then a server handing out another version mid-load is caught by the stored hashes instead of
/// returning mixed bytes. `None` when `opts` stand as they are.
pub fn verifying(file: &TensorFile, opts: &LoadOptions) -> Option<LoadOptions> {
    (!opts.verify_hash && !file.source().pins_version()).then(|| LoadOptions { verify_hash: true, ..opts.clone() })
}

/// The smallest piece a remote load's last pieces are split into (see [`plan::Plan::taper`]).
const TAPER_MIN: u64 = 4 << 20;

/// How often the thread that started a load runs its `tick` while the readers work.
pub const TICK: Duration = Duration::from_millis(100);

/// Counts a reader out when it ends, however it ends (a panicking reader too), so the thread
/// waiting for the readers cannot wait forever.
pub struct ReaderExit<'a> {
    pub active: &'a Mutex<usize>,
    pub wake: &'a Condvar,
}

impl Drop for ReaderExit<'_> {
    fn drop(&mut self) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.wake.notify_all();
    }
}

/// On the thread that started a load: wait until every reader has counted itself out, running
/// `tick` about every [`TICK`] meanwhile (until the load fails); an error from it goes to
/// `fail`, which stops the readers.
pub fn wait_for_readers(
    active: &Mutex<usize>,
    wake: &Condvar,
    failed: &AtomicBool,
    mut tick: Option<&mut dyn FnMut() -> Result<()>>,
    fail: &dyn Fn(Error),
) {
    let wait = if tick.is_some() { TICK } else { Duration::from_secs(3600) };
    let mut n = active.lock().unwrap_or_else(|p| p.into_inner());
    while *n > 0 {
        n = wake.wait_timeout(n, wait).unwrap_or_else(|p| p.into_inner()).0;
        if *n == 0 || failed.load(Ordering::Relaxed) {
            continue;
        }
        if let Some(tick) = tick.as_mut() {
            drop(n);
            if let Err(e) = tick() {
                fail(e);
            }
            n = active.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Load the index entries `which` into fresh host buffers, returned in the same order.
/// `tick` runs on the calling thread about every [`TICK`] while the readers work; an error
/// from it stops the load (the bindings check Python's signals there, so Ctrl-C works).
pub fn load_to_host(
    file: &TensorFile,
    which: &[usize],
    opts: &LoadOptions,
    mut tick: Option<&mut dyn FnMut() -> Result<()>>,
) -> Result<Vec<LoadedTensor>> {
    check_keys(file, opts.keys.as_ref())?;
    let verified;
    let opts = match verifying(file, opts) {
        Some(o) => {
            verified = o;
            &verified
        }
        None => opts,
    };
    let name = file.name().to_string();
    let mut buffers = Vec::with_capacity(which.len());
    for &i in which {
        let e = &file.entries[i];
        let nbytes = e.expected_nbytes().map_err(|err| err.in_tensor(&e.name_lossy()).in_file(&name))?;
        let meta = e.data_length == 0;
        let buf =
            HostBuffer::new(nbytes as usize, meta).map_err(|err| err.in_tensor(&e.name_lossy()).in_file(&name))?;
        buffers.push(buf);
    }
    crate::trace::mark("host_buffers_made", which.len() as u64, 0);
    let wanted = opts.num_readers.unwrap_or_else(|| file.source().preferred_parallelism()).clamp(1, 64);
    let mut plan = plan::build(&file.entries, which);
    if file.name().contains("://") && plan::tapering() {
        plan.taper(wanted, TAPER_MIN);
    }
    let slots: Vec<Slot> = which
        .iter()
        .zip(&buffers)
        .zip(&plan.pieces)
        .map(|((&entry, buf), &pieces)| Slot {
            entry,
            dest: buf.as_ptr(),
            header: Mutex::new(Vec::new()),
            remaining: AtomicUsize::new(pieces),
            module_idx: Mutex::new(0),
        })
        .collect();
    let readers = wanted.min(plan.items.len().max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        failed.store(true, Ordering::Relaxed);
        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    };
    let (active, wake) = (Mutex::new(0usize), Condvar::new());
    std::thread::scope(|s| {
        for w in 0..readers {
            *active.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            let exit = ReaderExit { active: &active, wake: &wake };
            let spawned = std::thread::Builder::new().name(format!("tz-read{w}")).spawn_scoped(s, || {
                let _exit = exit;
                let mut scratch = Vec::new();
                crate::trace::mark("reader_start", 0, 0);
                reads_stop_on(&failed, || {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = plan.items.get(i) else { break };
                        if let Err(e) = run_item(file, &slots, item, opts, &mut scratch, &failed) {
                            fail(e);
                        }
                    }
                });
                crate::trace::mark("reader_end", 0, 0);
            });
            if let Err(e) = spawned {
                // The readers already started finish the plan; none started is an error.
                if w == 0 {
                    fail(Error::io(format!("cannot start a reader thread: {e}")));
                }
                break;
            }
        }
        wait_for_readers(&active, &wake, &failed, tick.take(), &fail);
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.in_file(&name));
    }
    Ok(slots
        .into_iter()
        .zip(buffers)
        .map(|(slot, data)| LoadedTensor {
            entry: slot.entry,
            module_idx: slot.module_idx.into_inner().unwrap_or_else(|p| p.into_inner()),
            data,
        })
        .collect())
}

fn run_item(
    file: &TensorFile,
    slots: &[Slot],
    item: &Item,
    opts: &LoadOptions,
    scratch: &mut Vec<u8>,
    stop: &AtomicBool,
) -> Result<()> {
    match item {
        Item::Segment { start, len, parts } => {
            scratch.resize(*len, 0);
            read(file, *start, scratch, stop).map_err(|e| with_tensor(e, file, slots, parts[0].slot))?;
            for p in parts {
                let slot = &slots[p.slot];
                *slot.header.lock().unwrap_or_else(|e| e.into_inner()) = scratch[p.header.clone()].to_vec();
                if let Some(d) = &p.data {
                    // SAFETY: the plan gives each slot's data range to exactly one item.
                    unsafe { std::ptr::copy_nonoverlapping(scratch[d.clone()].as_ptr(), slot.dest, d.len()) };
                }
                finish_piece(file, slots, p.slot, opts)?;
            }
        }
        Item::Direct { slot, file_offset, offset, len } => {
            let s = &slots[*slot];
            // SAFETY: disjoint piece of the slot's buffer, which outlives the scoped threads.
            let dest = unsafe { std::slice::from_raw_parts_mut(s.dest.add(*offset as usize), *len as usize) };
            crate::trace::mark("piece", *file_offset, *len);
            read(file, *file_offset, dest, stop).map_err(|e| with_tensor(e, file, slots, *slot))?;
            crate::trace::mark("piece_end", *file_offset, *len);
            finish_piece(file, slots, *slot, opts)?;
        }
    }
    Ok(())
}

/// One item's bytes: as one streamed request from sources that read straight into our buffers
/// (plain HTTP: no copy, and no hand-off to the network threads), else with `read_at`. A
/// streamed read ends early once `stop` is set (a slow server must not hold up a failed load).
fn read(file: &TensorFile, offset: u64, buf: &mut [u8], stop: &AtomicBool) -> Result<()> {
    let source = file.source();
    if source.reads_into_buffers() {
        source.read_stream_into(offset, buf.len(), &mut SliceDest::new(buf).stopped_by(stop))
    } else {
        source.read_at(offset, buf)
    }
}

fn with_tensor(e: Error, file: &TensorFile, slots: &[Slot], slot: usize) -> Error {
    e.in_tensor(&file.entries[slots[slot].entry].name_lossy())
}

fn finish_piece(file: &TensorFile, slots: &[Slot], slot: usize, opts: &LoadOptions) -> Result<()> {
    let s = &slots[slot];
    if s.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
        return Ok(());
    }
    let e = &file.entries[s.entry];
    let header = std::mem::take(&mut *s.header.lock().unwrap_or_else(|p| p.into_inner()));
    let len = e.data_length as usize;
    // SAFETY: every piece of this slot is done, so this thread is its only user now.
    let data = unsafe { std::slice::from_raw_parts_mut(s.dest, len) };
    let module_idx = finalize(file, e, &header, data, opts).map_err(|err| err.in_tensor(&e.name_lossy()))?;
    *s.module_idx.lock().unwrap_or_else(|p| p.into_inner()) = module_idx;
    Ok(())
}

/// Check the record header against the index, decrypt, and verify hashes.
pub fn finalize(
    file: &TensorFile,
    e: &IndexEntry,
    header_bytes: &[u8],
    data: &mut [u8],
    opts: &LoadOptions,
) -> Result<u16> {
    let has_crypt = file.header.has_crypt_info();
    let h = TensorHeader::parse(header_bytes, e.wide_shape(), has_crypt)?;
    if h.name != e.name
        || h.dtype.stored != e.dtype.stored
        || h.shape != e.shape
        || h.data_length as u64 != e.data_length
    {
        return Err(Error::format(format!(
            "tensor header disagrees with the metadata index (header: name {:?}, dtype {:?}, shape {:?}, {} bytes)",
            String::from_utf8_lossy(&h.name),
            String::from_utf8_lossy(&h.dtype.stored),
            h.shape,
            h.data_length
        )));
    }
    if let Some(info) = &h.crypt {
        match info.cipher()? {
            Some(_) => {
                let keys = opts
                    .keys
                    .as_ref()
                    .ok_or_else(|| Error::crypto("Tensor is encrypted, but decryption was not requested"))?;
                // A key derivation gives up when the load stops (Ctrl-C, another tensor failed).
                crypto::decrypt_tensor_until(keys, info, data, &crate::storage::load_stopped)?;
            }
            None if !data.is_empty() => {
                return Err(Error::crypto("Tensor is not encrypted, but decryption was requested"));
            }
            None => {}
        }
    }
    if opts.verify_hash {
        verify_hashes(&h, header_bytes, data)?;
    }
    Ok(h.module_idx)
}

pub fn verify_hashes(h: &TensorHeader, header_bytes: &[u8], data: &[u8]) -> Result<()> {
    if h.hashes.is_empty() {
        return Err(Error::new(ErrorKind::HashMismatch, "no hashes stored to verify against"));
    }
    let mut hasher = RecordHasher::new(h.hashes.iter().map(|x| x.kind), &h.hashable(header_bytes));
    hasher.update(data);
    for (kind, digest) in hasher.finish() {
        let stored = h.hashes.iter().find(|x| x.kind == kind).expect("hashed kinds come from the header");
        if stored.value != digest {
            let name = if kind == 0 { "CRC32" } else { "SHA256" };
            return Err(Error::new(ErrorKind::HashMismatch, format!("{name} hash mismatch: the data is corrupted")));
        }
    }
    Ok(())
}
