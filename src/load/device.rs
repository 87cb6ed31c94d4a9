//! Loading tensors straight into device memory that the caller already owns (PyTorch
//! allocations, or a module's existing parameters).
//!
//! The plan is the host pipeline's (`plan::build_sized`), sized to the staging buffers: small
//! records are read together, large tensors in chunks. Reader threads check a pinned buffer
//! out of the device's pool, read file bytes into it (through the page cache when they are
//! cached, with O_DIRECT when they are not), queue the host→device copy on their stream and
//! hand the buffer back; the pool's events keep a buffer from being overwritten before its copy
//! ran. Optionally some readers skip the staging copy for cached data: they page-lock the
//! file's own page-cache pages (`cuMemHostRegister` on a read-only mapping) and copy from them.
//!
//! Ordering with PyTorch: our streams first wait for an event recorded on torch's current
//! stream (so memory torch just allocated or freed is ready), and at the end torch's stream waits
//! for ours; the call also synchronises its streams before returning, so the bytes are in place
//! when it returns and no copy can outlive the destination.
//!
//! Encrypted files: large tensors are split into pieces like plain ones, and each 2 MiB cipher
//! chunk is authenticated and decrypted in the staging buffer it was read into, right before
//! its copy, so decryption spreads over all readers and overlaps with reads and copies. Small
//! encrypted tensors go whole through one buffer. With `verify_hash` everything goes tensor by
//! tensor (the hash runs over the data in order): hashed as the chunks stream past, an encrypted
//! tensor larger than a buffer decrypted in a temporary host buffer.
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Instant;

use super::exec::{self, LoadOptions};
use super::file::TensorFile;
use super::plan::{self, Item};
use crate::buffer::HostBuffer;
use crate::crypto::{self, DecryptPlan};
use crate::cuda::counters::{self, Counter};
use crate::cuda::{self, Engine, Event, Pool, Registration, Staged, StreamHandle};
use crate::error::{Error, ErrorKind, Result};
use crate::format::hash::RecordHasher;
use crate::format::{IndexEntry, TensorHeader};
use crate::storage::StreamDest;

/// One tensor to load: index entry `entry` into `nbytes` bytes of device memory at `dest`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceTarget {
    pub entry: usize,
    pub dest: u64,
    pub nbytes: u64,
}

/// How file bytes reach the staging buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// Per read: through the page cache when the pages are cached, O_DIRECT when they are not.
    Auto,
    /// Always through the page cache.
    Buffered,
    /// Always O_DIRECT (where the file system allows it).
    Direct,
    /// Like `Auto`, but cached bytes are copied out of the file's mapping with non-temporal
    /// stores instead of `pread` (less memory traffic; a file truncated meanwhile would fault).
    Mmap,
}

impl IoMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "buffered" => Ok(IoMode::Buffered),
            "direct" => Ok(IoMode::Direct),
            "mmap" => Ok(IoMode::Mmap),
            _ => Err(Error::value(format!("unknown io mode {s:?} (expected auto, buffered, direct or mmap)"))),
        }
    }
}

#[derive(Clone)]
pub struct DeviceOptions {
    /// Readers (`num_readers`), `verify_hash` and decryption keys, as for host loads.
    pub base: LoadOptions,
    /// CUDA device ordinal.
    pub device: i32,
    /// The stream handle PyTorch is using (0: the legacy default stream).
    pub stream: u64,
    pub io: IoMode,
    /// How many of the readers copy cached data straight from registered page-cache pages
    /// instead of through staging (0 disables; `usize::MAX`: all of them).
    pub register_readers: usize,
}

impl DeviceOptions {
    pub fn new(device: i32, stream: u64) -> Self {
        DeviceOptions { base: LoadOptions::default(), device, stream, io: IoMode::Auto, register_readers: 0 }
    }
}

/// What one load did.
#[derive(Clone, Debug, Default)]
pub struct DeviceStats {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub readers: usize,
    pub staged_bytes: u64,
    pub registered_bytes: u64,
    pub pageable_bytes: u64,
    pub h2d_copies: u64,
    pub batched_copy_calls: u64,
    pub zero_fills: u64,
    pub direct_read_bytes: u64,
    pub buffered_read_bytes: u64,
    pub staging_chunk: usize,
    pub staging_buffers: usize,
}

/// Readers used when `num_readers` is not given (`TENSORIZER_RS_READERS` overrides): one per
/// core, 4 to 12. The host->device copies read the staging buffers from the memory the readers
/// write them into: beside 16 reading threads the copies ran at 47.7–52.6 GB/s, beside 12 at
/// 51.2–53.9 (H200 hosts, docs/benchmarks.md "the staged cap"). With one buffer each, 16
/// readers had still been ahead of 12 (b85eae3): a reader waited on its own buffer's copy.
pub fn default_readers() -> usize {
    env_usize("TENSORIZER_RS_READERS").filter(|&n| n > 0).unwrap_or_else(|| crate::cores().clamp(4, 12)).min(64)
}

/// Staging buffers per reader of a local, unencrypted load (`TENSORIZER_RS_BUFFERS_PER_READER`
/// overrides): two, so that a reader fills one while the other's copy runs.
pub fn buffers_per_reader() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| env_usize("TENSORIZER_RS_BUFFERS_PER_READER").filter(|&n| n > 0).unwrap_or(2).min(8))
}

/// Bytes a local reader puts in a staging buffer per read (`TENSORIZER_RS_LOCAL_FILL`
/// overrides; at most the buffer): 12 readers x 2 buffers x 4 MiB keep 96 MiB in flight, as
/// 12 x 8 MiB did. Against 16 readers x one 8 MiB buffer: ahead in 19 of 21 interleaved pairs
/// on two H200 hosts, +0.8 GB/s on average (docs/benchmarks.md).
fn local_fill(chunk: usize) -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    let n = *N.get_or_init(|| env_usize("TENSORIZER_RS_LOCAL_FILL").filter(|&n| n >= PAGE as usize).unwrap_or(4 << 20));
    n.min(chunk)
}

fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok())
}

/// Bytes of encrypted data one staging buffer takes per read: whole cipher chunks (0: none fit).
fn sealed_step(chunk: usize) -> usize {
    chunk / crypto::CHUNK_SIZE * crypto::CHUNK_SIZE
}

/// Readers for encrypted files, whose load is bound by decryption: one per core.
fn cpu_readers() -> usize {
    crate::cores().clamp(4, 64)
}

const PAGE: u64 = 4096;
/// Reads smaller than this never use O_DIRECT (not worth the alignment dance).
const DIRECT_MIN: usize = 256 << 10;
/// Pieces of large tensors; a staging reader splits each into buffer-sized reads, a
/// registering reader page-locks it whole.
const PIECE: u64 = 64 << 20;
/// Pieces of large tensors in remote files: each is one ranged request, streamed through
/// staging buffers (`TENSORIZER_RS_REMOTE_PIECE` overrides it, for benchmarks).
fn remote_piece(chunk: u64) -> u64 {
    let env = std::env::var("TENSORIZER_RS_REMOTE_PIECE").ok().and_then(|v| v.trim().parse::<u64>().ok());
    env.unwrap_or(PIECE).max(chunk)
}
/// Largest coalesced read of small records.
const SEGMENT_MAX: u64 = 2 << 20;
/// Registered ranges a reader keeps in flight before waiting for the oldest copy.
const MAX_REGISTERED: usize = 2;

fn align_down(x: u64) -> u64 {
    x & !(PAGE - 1)
}
fn align_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Where bytes come from: the file's `Source`, plus, for local files, an O_DIRECT descriptor
/// and a read-only mapping (for page-cache residency checks and registration).
struct Io<'a> {
    file: &'a TensorFile,
    mode: IoMode,
    direct: Option<File>,
    direct_ok: AtomicBool,
    map: Option<Mapping>,
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `Io::open` with this length.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl<'a> Io<'a> {
    fn open(file: &'a TensorFile, mode: IoMode) -> Self {
        let mut io = Io { file, mode, direct: None, direct_ok: AtomicBool::new(false), map: None };
        let path = file.name();
        if path.contains("://") {
            return io;
        }
        let Ok(plain) = File::open(path) else { return io };
        if plain.metadata().map(|m| m.len()).ok() != Some(file.size()) || file.size() == 0 {
            return io;
        }
        if mode != IoMode::Buffered {
            io.direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok();
            io.direct_ok.store(io.direct.is_some(), Ordering::Relaxed);
        }
        let len = file.size() as usize;
        // SAFETY: a read-only shared mapping of a file we hold open; never written through.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, plain.as_raw_fd(), 0) };
        if ptr != libc::MAP_FAILED {
            io.map = Some(Mapping { ptr: ptr as *mut u8, len });
        }
        io
    }

    /// Whether every page of `offset..offset + len` is in the page cache.
    fn resident(&self, offset: u64, len: usize) -> bool {
        let Some(map) = &self.map else { return true };
        let start = align_down(offset);
        let end = (offset + len as u64).min(map.len as u64);
        if end <= start {
            return true;
        }
        let pages = (end - start).div_ceil(PAGE) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range lies inside our mapping; `vec` has one byte per page.
        let r = unsafe {
            libc::mincore(map.ptr.add(start as usize) as *mut libc::c_void, (end - start) as usize, vec.as_mut_ptr())
        };
        r != 0 || vec.iter().all(|&b| b & 1 == 1)
    }

    fn wants_direct(&self, offset: u64, len: usize) -> bool {
        if !self.direct_ok.load(Ordering::Relaxed) || len < DIRECT_MIN {
            return false;
        }
        match self.mode {
            IoMode::Buffered => false,
            IoMode::Direct => true,
            IoMode::Auto | IoMode::Mmap => !self.resident(offset, len),
        }
    }

    /// Copy cached bytes straight out of the mapping (`IoMode::Mmap`); false if not possible.
    fn read_mapped(&self, offset: u64, len: usize, st: &mut Staged) -> bool {
        let Some(map) = &self.map else { return false };
        if offset + len as u64 > map.len as u64 || !self.resident(offset, len) {
            return false;
        }
        let start = align_down(offset);
        // SAFETY: the range lies inside our read-only mapping of a file of at least that size;
        // populating the page tables in one call is cheaper than faulting page by page.
        unsafe {
            libc::madvise(
                map.ptr.add(start as usize) as *mut libc::c_void,
                (offset + len as u64 - start) as usize,
                libc::MADV_POPULATE_READ,
            );
            copy_streaming(st.slice_mut(len).as_mut_ptr(), map.ptr.add(offset as usize), len);
        }
        true
    }

    /// Read `offset..offset + len` into `st`; returns where in the buffer the bytes start
    /// (non-zero after an aligned O_DIRECT read).
    fn read(&self, offset: u64, len: usize, st: &mut Staged, tally: &Tally) -> Result<usize> {
        if self.mode == IoMode::Mmap && self.read_mapped(offset, len, st) {
            tally.add(Counter::BufferedRead, len as u64);
            return Ok(0);
        }
        if self.wants_direct(offset, len) {
            match self.read_direct(offset, len, st) {
                Ok(delta) => {
                    tally.add(Counter::DirectRead, len as u64);
                    return Ok(delta);
                }
                Err(e) if e.kind == ErrorKind::Unsupported => self.direct_ok.store(false, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        self.file.source().read_at(offset, st.slice_mut(len))?;
        tally.add(Counter::BufferedRead, len as u64);
        Ok(0)
    }

    fn read_direct(&self, offset: u64, len: usize, st: &mut Staged) -> Result<usize> {
        let fd = self.direct.as_ref().expect("direct_ok implies a descriptor").as_raw_fd();
        let start = align_down(offset);
        let need = (offset + len as u64 - start) as usize;
        let total = (align_up(offset + len as u64) - start) as usize;
        let buf = st.slice_mut(total);
        let mut got = 0usize;
        while got < need {
            // SAFETY: reading into our pinned buffer, which is page-aligned, as is `got` here.
            let n = unsafe {
                libc::pread(fd, buf[got..].as_mut_ptr() as *mut libc::c_void, total - got, (start + got as u64) as i64)
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                        return Err(Error::new(ErrorKind::Unsupported, "O_DIRECT not usable here"))
                    }
                    _ => return Err(Error::from(err).in_file(self.file.name())),
                }
            }
            if n == 0 {
                return Err(Error::format("file is truncated").in_file(self.file.name()));
            }
            got += n as usize;
        }
        Ok((offset - start) as usize)
    }
}

/// `memcpy` with non-temporal stores where the CPU has AVX2: the destination (a staging
/// buffer) is read next by the GPU, not the CPU, so filling caches with it only costs bandwidth.
///
/// # Safety
/// `src` readable and `dst` writable for `len` bytes, not overlapping.
unsafe fn copy_streaming(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; the caller's contract covers the ranges.
        unsafe { copy_streaming_avx2(dst, src, len) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_streaming_avx2(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): all accesses stay within `len` bytes of `src`/`dst`; stores are to
    // 32-byte aligned addresses after the head.
    unsafe {
        let head = dst.align_offset(32).min(len);
        std::ptr::copy_nonoverlapping(src, dst, head);
        let mut i = head;
        while i + 128 <= len {
            let s = src.add(i) as *const __m256i;
            let d = dst.add(i) as *mut __m256i;
            let (a, b, c, e) = (
                _mm256_loadu_si256(s),
                _mm256_loadu_si256(s.add(1)),
                _mm256_loadu_si256(s.add(2)),
                _mm256_loadu_si256(s.add(3)),
            );
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            _mm256_stream_si256(d.add(2), c);
            _mm256_stream_si256(d.add(3), e);
            i += 128;
        }
        while i + 32 <= len {
            _mm256_stream_si256(dst.add(i) as *mut __m256i, _mm256_loadu_si256(src.add(i) as *const __m256i));
            i += 32;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        _mm_sfence();
    }
}

/// Per-load tallies, mirrored into the process-wide counters.
#[derive(Default)]
struct Tally {
    staged: AtomicU64,
    registered: AtomicU64,
    pageable: AtomicU64,
    copies: AtomicU64,
    batch_calls: AtomicU64,
    zero_fills: AtomicU64,
    direct: AtomicU64,
    buffered: AtomicU64,
    /// Bytes whose copy (or zero fill) has been queued, for progress reports.
    done: AtomicU64,
}

impl Tally {
    fn add(&self, c: Counter, n: u64) {
        let cell = match c {
            Counter::Staged => &self.staged,
            Counter::Registered => &self.registered,
            Counter::Pageable => &self.pageable,
            Counter::Copies => &self.copies,
            Counter::BatchCalls => &self.batch_calls,
            Counter::ZeroFills => &self.zero_fills,
            Counter::DirectRead => &self.direct,
            Counter::BufferedRead => &self.buffered,
            _ => return counters::add(c, n),
        };
        cell.fetch_add(n, Ordering::Relaxed);
        counters::add(c, n);
    }
}

struct Slot {
    entry: usize,
    dest: u64,
    nbytes: u64,
    header: Mutex<Vec<u8>>,
    remaining: AtomicUsize,
    module_idx: AtomicU16,
    /// Encrypted tensors loaded in pieces: how to open them, set by the first piece to start.
    sealed: Mutex<Option<std::sync::Arc<Sealed>>>,
}

/// How the pieces of one encrypted tensor are opened.
enum Sealed {
    /// Cipher chunks that tile the staging buffers: each piece decrypts its own.
    Chunks { plan: DecryptPlan, chunk: usize },
    /// The file's cipher chunks don't line up with our pieces (a foreign chunk size, or one
    /// MAC over the whole tensor): the first piece loads the tensor whole, the others skip.
    Whole,
}

enum Work {
    Plan(Item),
    /// One whole tensor, for encrypted files and hash verification.
    Whole(usize),
    /// `len` bytes at `offset` of a large encrypted tensor's data.
    Sealed {
        slot: usize,
        offset: u64,
        len: u64,
    },
}

struct Job<'a> {
    file: &'a TensorFile,
    io: Io<'a>,
    opts: &'a DeviceOptions,
    engine: &'a Engine,
    pool: std::sync::Arc<Pool>,
    slots: Vec<Slot>,
    work: Vec<Work>,
    next: AtomicUsize,
    failed: AtomicBool,
    first_error: Mutex<Option<Error>>,
    tally: Tally,
    /// An HTTP(S) or S3 source: large pieces are streamed, one request each.
    remote: bool,
    /// Staging buffers this load may make (`Pool::acquire`): `buffers_per_reader` per reader
    /// for a local unencrypted file, one per reader for an encrypted one; the whole pool for a
    /// remote one, as before: one buffer per reader made no difference there (HTTP to CUDA,
    /// H200 host, docs/benchmarks.md).
    buffers: usize,
    /// Bytes of a large tensor one staged read takes (`local_fill` for local unencrypted
    /// files, else the whole buffer).
    fill: usize,
    /// Readers still running, and a signal for the coordinating thread.
    active: Mutex<usize>,
    wake: Condvar,
}

/// Load `targets` into device memory. Returns each target's module index, in order, and what
/// the load did. `progress(bytes_done, bytes_total)` is called from the calling thread about
/// every 100 ms and once at the end; an error from it stops the load.
pub fn load_to_device(
    file: &TensorFile,
    targets: &[DeviceTarget],
    opts: &DeviceOptions,
    mut progress: Option<&mut dyn FnMut(u64, u64) -> Result<()>>,
) -> Result<(Vec<u16>, DeviceStats)> {
    let started = Instant::now();
    crate::trace::mark("load_enter", targets.len() as u64, 0);
    exec::check_keys(file, opts.base.keys.as_ref())?;
    let verified;
    let opts = match exec::verifying(file, &opts.base) {
        Some(base) => {
            verified = DeviceOptions { base, ..opts.clone() };
            &verified
        }
        None => opts,
    };
    let name = file.name().to_string();
    let mut total = 0u64;
    for t in targets {
        let e = file
            .entries
            .get(t.entry)
            .ok_or_else(|| Error::value(format!("no tensor at index {}", t.entry)).in_file(&name))?;
        let want = e.expected_nbytes().map_err(|err| err.in_tensor(&e.name_lossy()).in_file(&name))?;
        if want != t.nbytes {
            return Err(Error::value(format!("destination holds {} bytes, the tensor needs {want}", t.nbytes))
                .in_tensor(&e.name_lossy())
                .in_file(&name));
        }
        if t.nbytes > 0 && t.dest == 0 {
            return Err(Error::value("null destination pointer").in_tensor(&e.name_lossy()).in_file(&name));
        }
        total += t.nbytes;
    }
    let engine = Engine::get(opts.device)?;
    let _bound = engine.ctx.bind_scoped()?;
    let pool = engine.pool();
    crate::trace::mark("load_engine", 0, 0);
    let chunk = pool.chunk() as u64;

    let encrypted = file.header.has_crypt_info();
    let remote = file.name().contains("://");
    // Decryption is CPU-bound: encrypted loads use every core by default. Over the network each
    // reader waits on one request at a time: one reader per buffer keeps the most in flight
    // (HTTP on the H200 host: 16.3 vs 13.0–13.8 GB/s with 12, docs/benchmarks.md), except where
    // readers receive the bodies themselves (plain HTTP): there the source's own figure, one per
    // core (24.2–24.3 vs 20.4–22.8 GB/s with 32).
    let default = || {
        if remote && file.source().reads_into_buffers() {
            return file.source().preferred_parallelism();
        }
        let cpu = if encrypted { cpu_readers() } else { default_readers() };
        if remote {
            cpu.max(pool.max_buffers())
        } else {
            cpu
        }
    };
    let wanted = opts.base.num_readers.unwrap_or_else(default).clamp(1, 64);

    let entry_ids: Vec<usize> = targets.iter().map(|t| t.entry).collect();
    // Encrypted data is read a whole number of cipher chunks at a time.
    let step = sealed_step(chunk as usize) as u64;
    let (work, pieces) = if opts.base.verify_hash || (encrypted && step == 0) {
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_by_key(|&s| file.entries[targets[s].entry].header_offset);
        (order.into_iter().map(Work::Whole).collect::<Vec<_>>(), vec![1; targets.len()])
    } else if encrypted {
        // Small tensors whole through one buffer; large ones in pieces made of `step`-sized
        // reads, so every read but a tensor's last holds whole cipher chunks.
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_by_key(|&s| file.entries[targets[s].entry].header_offset);
        let piece = (PIECE / step).max(1) * step;
        let (mut work, mut pieces) = (Vec::new(), vec![1; targets.len()]);
        for s in order {
            let len = targets[s].nbytes;
            if len <= chunk {
                work.push(Work::Whole(s));
                continue;
            }
            pieces[s] = len.div_ceil(piece) as usize;
            let mut offset = 0;
            while offset < len {
                work.push(Work::Sealed { slot: s, offset, len: piece.min(len - offset) });
                offset += piece;
            }
        }
        (work, pieces)
    } else {
        // Segments of small records stay small enough that files of many tiny tensors still
        // spread over all readers (each record costs a header check and a copy launch).
        let small = (chunk / 4).min(plan::SMALL_RECORD);
        let piece = if remote { remote_piece(chunk) } else { PIECE.max(chunk) };
        let mut p = plan::build_sized(&file.entries, &entry_ids, small, chunk.min(SEGMENT_MAX), piece);
        if remote && plan::tapering() {
            p.taper(wanted, chunk);
        }
        (p.items.into_iter().map(Work::Plan).collect(), p.pieces)
    };
    let slots = targets
        .iter()
        .zip(pieces)
        .map(|(t, pieces)| Slot {
            entry: t.entry,
            dest: t.dest,
            nbytes: t.nbytes,
            header: Mutex::new(Vec::new()),
            remaining: AtomicUsize::new(pieces),
            module_idx: AtomicU16::new(0),
            sealed: Mutex::new(None),
        })
        .collect();
    let readers = wanted.min(work.len().max(1));
    let local = !remote && !encrypted;
    let buffers = if remote {
        pool.max_buffers()
    } else if local {
        readers * buffers_per_reader()
    } else {
        readers
    };
    let fill = if local { local_fill(pool.chunk()) } else { pool.chunk() };
    let job = Job {
        file,
        io: Io::open(file, opts.io),
        opts,
        engine: &engine,
        pool,
        slots,
        work,
        next: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        first_error: Mutex::new(None),
        tally: Tally::default(),
        remote,
        buffers,
        fill,
        active: Mutex::new(readers),
        wake: Condvar::new(),
    };

    crate::trace::mark("load_planned", job.work.len() as u64, 0);
    // Copies start only after the work already queued on torch's stream.
    // SAFETY: the caller passes PyTorch's current stream of this device (or 0).
    let torch_stream = unsafe { cuda::foreign_stream(opts.stream) };
    let ordered = (|| -> Result<()> {
        let ev = Event::new()?;
        ev.record(torch_stream)?;
        for s in &engine.streams {
            ev.wait_on(s.handle())?;
        }
        Ok(())
    })();
    if let Err(e) = ordered {
        return Err(e.in_file(&name));
    }

    crate::trace::mark("load_start", total, readers as u64);
    std::thread::scope(|scope| {
        for w in 0..readers {
            let job = &job;
            let exit = exec::ReaderExit { active: &job.active, wake: &job.wake };
            let spawned = std::thread::Builder::new().name(format!("tz-gpu-read{w}")).spawn_scoped(scope, move || {
                let _exit = exit;
                crate::trace::mark("reader_start", w as u64, 0);
                if let Err(e) = crate::storage::reads_stop_on(&job.failed, || job.reader(w)) {
                    job.fail(e);
                }
                crate::trace::mark("reader_end", w as u64, 0);
                counters::add_thread_cpu(Counter::ReaderCpu);
            });
            if let Err(e) = spawned {
                job.fail(Error::io(format!("cannot start a reader thread: {e}")));
            }
        }
        let done = &job.tally.done;
        let mut tick = progress.as_mut().map(|cb| move || cb(done.load(Ordering::Relaxed), total));
        let tick = tick.as_mut().map(|t| t as &mut dyn FnMut() -> Result<()>);
        exec::wait_for_readers(&job.active, &job.wake, &job.failed, tick, &|e| job.fail(e));
    });

    // Whatever happened, no copy may outlive this call: torch's stream waits for ours, and we
    // wait for them too.
    crate::trace::mark("readers_done", total, 0);
    let finished = finish(&engine, torch_stream);
    crate::trace::mark("load_end", total, 0);
    if let Some(e) = job.first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e.in_file(&name));
    }
    finished.map_err(|e| e.in_file(&name))?;
    if let Some(cb) = progress.as_mut() {
        cb(total, total)?;
    }
    counters::add(Counter::Loads, 1);
    counters::add(Counter::BytesToDevice, total);
    let t = &job.tally;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let stats = DeviceStats {
        tensors: targets.len(),
        bytes: total,
        seconds: started.elapsed().as_secs_f64(),
        readers,
        staged_bytes: get(&t.staged),
        registered_bytes: get(&t.registered),
        pageable_bytes: get(&t.pageable),
        h2d_copies: get(&t.copies),
        batched_copy_calls: get(&t.batch_calls),
        zero_fills: get(&t.zero_fills),
        direct_read_bytes: get(&t.direct),
        buffered_read_bytes: get(&t.buffered),
        staging_chunk: job.pool.chunk(),
        staging_buffers: job.pool.max_buffers(),
    };
    Ok((job.slots.iter().map(|s| s.module_idx.load(Ordering::Relaxed)).collect(), stats))
}

fn finish(engine: &Engine, torch_stream: StreamHandle) -> Result<()> {
    let mut first = None;
    for s in &engine.streams {
        let r = Event::new().and_then(|ev| {
            ev.record(s.handle())?;
            ev.wait_on(torch_stream)
        });
        let synced = cuda::synchronize(s.handle());
        if first.is_none() {
            first = r.err().or(synced.err());
        }
    }
    first.map_or(Ok(()), Err)
}

/// Registered page-cache ranges whose copies may still run; dropping waits for them.
struct Registered(VecDeque<(Registration, Event)>);

impl Registered {
    fn push(&mut self, reg: Registration, ev: Event) -> Result<()> {
        self.0.push_back((reg, ev));
        while self.0.len() > MAX_REGISTERED {
            let (reg, ev) = self.0.pop_front().expect("non-empty");
            let r = ev.synchronize();
            drop(reg);
            r?;
        }
        Ok(())
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        for (reg, ev) in self.0.drain(..) {
            let _ = ev.synchronize();
            drop(reg);
        }
    }
}

/// The staging side of [`Job::piece_streamed`]: the buffer being filled and where it goes.
struct Streamed<'j, 'a> {
    job: &'j Job<'a>,
    slot: usize,
    stream: StreamHandle,
    /// Offset in the tensor of the current buffer's first byte.
    at: u64,
    staged: Option<Staged>,
    fill: usize,
}

/// A remote read of at most one buffer's worth, into a staging buffer taken when the first
/// bytes come.
struct OneStaged<'j, 'a> {
    job: &'j Job<'a>,
    staged: Option<Staged>,
    fill: usize,
    len: usize,
}

impl StreamDest for OneStaged<'_, '_> {
    /// The load failed or was stopped: a read still waiting for bytes gives up.
    fn stopped(&self) -> bool {
        self.job.failed.load(Ordering::Relaxed)
    }
    fn room(&mut self) -> Result<&mut [u8]> {
        if self.staged.is_none() {
            self.staged = Some(self.job.pool.acquire(self.job.buffers)?);
        }
        let st = self.staged.as_mut().expect("taken above");
        Ok(&mut st.slice_mut(self.len)[self.fill..])
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        self.fill += n;
        Ok(())
    }
}

/// The source writes into the current staging buffer (straight from the socket for plain
/// HTTP); a full buffer goes to the device and the next one is taken when bytes come for it.
impl StreamDest for Streamed<'_, '_> {
    fn stopped(&self) -> bool {
        self.job.failed.load(Ordering::Relaxed)
    }
    fn room(&mut self) -> Result<&mut [u8]> {
        if self.stopped() {
            return Err(Error::io("stopped: another part of the load failed"));
        }
        let chunk = self.job.pool.chunk();
        if self.staged.is_none() {
            self.staged = Some(self.job.pool.acquire(self.job.buffers)?);
        }
        let st = self.staged.as_mut().expect("taken above");
        Ok(&mut st.slice_mut(chunk)[self.fill..])
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        self.fill += n;
        if self.fill == self.job.pool.chunk() {
            self.flush()?;
        }
        Ok(())
    }

    fn put(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let room = self.room()?;
            let n = bytes.len().min(room.len());
            // SAFETY: `room` (pinned memory no queued copy reads yet) holds at least `n` bytes,
            // and so does the source slice.
            unsafe { copy_streaming(room.as_mut_ptr(), bytes.as_ptr(), n) };
            bytes = &bytes[n..];
            self.advance(n)?;
        }
        Ok(())
    }
}

impl Streamed<'_, '_> {
    /// Queue the copy of what the current buffer holds and give the buffer back.
    fn flush(&mut self) -> Result<()> {
        let Some(mut st) = self.staged.take() else { return Ok(()) };
        let n = std::mem::take(&mut self.fill);
        st.used_on(self.stream);
        self.job.copy(self.slot, self.at, st.ptr(), n, self.stream, Counter::Staged)?;
        crate::trace::mark("flush", n as u64, 0);
        self.at += n as u64;
        Ok(())
    }
}

impl Job<'_> {
    fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::Relaxed);
        self.first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    }

    fn entry(&self, slot: usize) -> &IndexEntry {
        &self.file.entries[self.slots[slot].entry]
    }

    fn reader(&self, w: usize) -> Result<()> {
        self.engine.ctx.bind()?;
        let stream = self.engine.streams[w % self.engine.streams.len()].handle();
        let register = w < self.opts.register_readers && self.io.map.is_some();
        let mut registered = Registered(VecDeque::new());
        while !self.failed.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(work) = self.work.get(i) else { break };
            match work {
                Work::Plan(Item::Segment { start, len, parts }) => {
                    crate::trace::mark("segment", *start, *len as u64);
                    self.segment(*start, *len, parts, stream)
                        .map_err(|e| e.in_tensor(&self.entry(parts[0].slot).name_lossy()))?;
                }
                Work::Plan(Item::Direct { slot, file_offset, offset, len }) => {
                    crate::trace::mark("piece", *file_offset, *len);
                    let r = if self.remote {
                        self.piece_streamed(*slot, *file_offset, *offset, *len, stream)
                    } else if register && self.io.resident(*file_offset, *len as usize) {
                        self.piece_registered(*slot, *file_offset, *offset, *len, stream, &mut registered)
                    } else {
                        self.piece_staged(*slot, *file_offset, *offset, *len, stream)
                    };
                    r.and_then(|()| self.finish_piece(*slot))
                        .map_err(|e| e.in_tensor(&self.entry(*slot).name_lossy()))?;
                    crate::trace::mark("piece_end", *file_offset, *len);
                }
                Work::Whole(slot) => {
                    self.whole(*slot, stream).map_err(|e| e.in_tensor(&self.entry(*slot).name_lossy()))?;
                }
                Work::Sealed { slot, offset, len } => {
                    self.sealed_piece(*slot, *offset, *len, stream)
                        .map_err(|e| e.in_tensor(&self.entry(*slot).name_lossy()))?;
                }
            }
        }
        Ok(())
    }

    /// Queue a copy of `len` bytes at `src` into slot memory at `offset`.
    fn copy(
        &self,
        slot: usize,
        offset: u64,
        src: *const u8,
        len: usize,
        stream: StreamHandle,
        kind: Counter,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let s = &self.slots[slot];
        debug_assert!(offset + len as u64 <= s.nbytes);
        // SAFETY: the destination range lies inside the caller-provided device buffer (checked
        // against the tensor's size up front); `src` is pinned, registered or pageable memory
        // that stays untouched until the copy ran (the pool and `Registered` see to that).
        unsafe { cuda::copy_htod(s.dest + offset, src, len, stream)? };
        self.tally.add(kind, len as u64);
        self.tally.add(Counter::Copies, 1);
        self.tally.done.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn zero(&self, slot: usize, stream: StreamHandle) -> Result<()> {
        let s = &self.slots[slot];
        if s.nbytes > 0 {
            // SAFETY: the slot's whole device buffer.
            unsafe { cuda::zero_device(s.dest, s.nbytes as usize, stream)? };
            self.tally.add(Counter::ZeroFills, 1);
            self.tally.done.fetch_add(s.nbytes, Ordering::Relaxed);
        }
        Ok(())
    }

    fn segment(&self, start: u64, len: usize, parts: &[plan::SegmentPart], stream: StreamHandle) -> Result<()> {
        // A segment is at most one chunk unless a single header is larger (pathological):
        // then read it into ordinary memory.
        let mut heap = Vec::new();
        let mut staged = None;
        let ptr: *const u8 = if len <= self.pool.chunk() {
            let (mut st, delta) = self.read_staged(start, len)?;
            st.used_on(stream);
            // SAFETY: `delta + len` bytes were just read into the buffer.
            let p = unsafe { st.ptr().add(delta) };
            staged = Some(st);
            p
        } else {
            heap.resize(len, 0u8);
            self.file.source().read_at(start, &mut heap)?;
            self.tally.add(Counter::BufferedRead, len as u64);
            heap.as_ptr()
        };
        // SAFETY: `len` initialised bytes, alive (staged or heap) until the end of this call.
        let base = unsafe { std::slice::from_raw_parts(ptr, len) };
        let kind = if staged.is_some() { Counter::Staged } else { Counter::Pageable };
        // The segment's copies go to the driver together (one batched call where supported).
        let (mut dsts, mut srcs, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
        for p in parts {
            if let Some(d) = &p.data {
                if d.is_empty() {
                    self.zero(p.slot, stream)?;
                } else {
                    dsts.push(self.slots[p.slot].dest);
                    srcs.push(base[d.clone()].as_ptr() as u64);
                    sizes.push(d.len());
                }
            }
        }
        if !dsts.is_empty() {
            // SAFETY: each destination is its slot's whole device buffer (sizes checked up
            // front); the sources live in this segment's buffer until its event has passed.
            let batched = unsafe { cuda::copy_htod_many(&mut dsts, &mut srcs, &mut sizes, self.opts.device, stream)? };
            let bytes: usize = sizes.iter().sum();
            self.tally.add(kind, bytes as u64);
            self.tally.add(Counter::Copies, sizes.len() as u64);
            if batched {
                self.tally.add(Counter::BatchCalls, 1);
            }
            self.tally.done.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        for p in parts {
            *self.slots[p.slot].header.lock().unwrap_or_else(|e| e.into_inner()) = base[p.header.clone()].to_vec();
            self.finish_piece(p.slot).map_err(|e| e.in_tensor(&self.entry(p.slot).name_lossy()))?;
        }
        drop(staged);
        Ok(())
    }

    /// `len` bytes of a large tensor's data, read chunk by chunk through staging buffers.
    fn piece_staged(&self, slot: usize, file_offset: u64, offset: u64, len: u64, stream: StreamHandle) -> Result<()> {
        let chunk = self.fill as u64;
        let mut off = 0;
        while off < len {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let n = chunk.min(len - off) as usize;
            let (mut st, delta) = self.read_staged(file_offset + off, n)?;
            // SAFETY: `delta + n` bytes were just read into the buffer.
            let src = unsafe { st.ptr().add(delta) };
            st.used_on(stream);
            self.copy(slot, offset + off, src, n, stream, Counter::Staged)?;
            off += n as u64;
        }
        Ok(())
    }

    /// Read `n <= chunk` bytes at `offset` into a staging buffer; returns it and where in it the
    /// bytes start (non-zero after an aligned O_DIRECT read). From a remote source the buffer is
    /// taken only once the first bytes arrive: a reader holding a buffer while it waits for one
    /// of the source's request slots could, with enough readers, leave the slot holders
    /// waiting for buffers forever.
    fn read_staged(&self, offset: u64, n: usize) -> Result<(Staged, usize)> {
        if !self.remote {
            let mut st = self.pool.acquire(self.buffers)?;
            let started = crate::trace::enabled().then(crate::trace::now_ns);
            let delta = self.io.read(offset, n, &mut st, &self.tally)?;
            if let Some(t) = started {
                crate::trace::mark("read", crate::trace::now_ns() - t, n as u64);
            }
            return Ok((st, delta));
        }
        let mut one = OneStaged { job: self, staged: None, fill: 0, len: n };
        self.file.source().read_stream_into(offset, n, &mut one)?;
        let st = match one.staged {
            Some(st) => st,
            None => self.pool.acquire(self.buffers)?,
        };
        self.tally.add(Counter::BufferedRead, n as u64);
        Ok((st, 0))
    }

    /// A piece of a remote file: one request for all of it, its body copied into staging
    /// buffers as it arrives and each buffer sent to the device as soon as it is full.
    fn piece_streamed(&self, slot: usize, file_offset: u64, offset: u64, len: u64, stream: StreamHandle) -> Result<()> {
        let mut out = Streamed { job: self, slot, stream, at: offset, staged: None, fill: 0 };
        self.file.source().read_stream_into(file_offset, len as usize, &mut out)?;
        out.flush()?;
        self.tally.add(Counter::BufferedRead, len);
        Ok(())
    }

    /// A cached piece copied straight from the file's page-cache pages: the whole pages are
    /// registered and copied; the partial pages at either end go through a staging buffer (a
    /// page may be shared with a neighbour, and one page may be registered only once).
    fn piece_registered(
        &self,
        slot: usize,
        file_offset: u64,
        offset: u64,
        len: u64,
        stream: StreamHandle,
        registered: &mut Registered,
    ) -> Result<()> {
        let map = self.io.map.as_ref().expect("registering readers need the mapping");
        let (s, e) = (file_offset, file_offset + len);
        let (ps, pe) = (align_up(s), align_down(e));
        if pe <= ps {
            return self.piece_staged(slot, file_offset, offset, len, stream);
        }
        // SAFETY: `ps..pe` lies within the mapping (the file is at least `e` bytes long).
        let body = unsafe { map.ptr.add(ps as usize) };
        let reg = Registration::new(body, (pe - ps) as usize)?;
        self.copy(slot, offset + (ps - s), body, (pe - ps) as usize, stream, Counter::Registered)?;
        let ev = Event::new()?;
        ev.record(stream)?;
        registered.push(reg, ev)?;
        if ps > s {
            self.piece_staged(slot, s, offset, ps - s, stream)?;
        }
        if e > pe {
            self.piece_staged(slot, pe, offset + (pe - s), e - pe, stream)?;
        }
        Ok(())
    }

    fn finish_piece(&self, slot: usize) -> Result<()> {
        let s = &self.slots[slot];
        if s.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        let header = std::mem::take(&mut *s.header.lock().unwrap_or_else(|p| p.into_inner()));
        // Streaming mode: the pieces were decrypted (if at all) as they passed; only the header
        // checks here (the keys let an encrypted header pass; with no data nothing is opened).
        let module_idx = exec::finalize(self.file, self.entry(slot), &header, &mut [], &self.opts.base)?;
        s.module_idx.store(module_idx, Ordering::Relaxed);
        Ok(())
    }

    /// How to open `slot`'s pieces: the first piece to get here reads the tensor's header and
    /// plans its decryption.
    fn sealed(&self, slot: usize) -> Result<std::sync::Arc<Sealed>> {
        let s = &self.slots[slot];
        let mut guard = s.sealed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sealed) = guard.as_ref() {
            return Ok(sealed.clone());
        }
        let e = self.entry(slot);
        let mut header = vec![0u8; (e.data_offset - e.header_offset) as usize];
        self.file.source().read_at(e.header_offset, &mut header)?;
        let h = TensorHeader::parse(&header, e.wide_shape(), true)?;
        let info =
            h.crypt.as_ref().ok_or_else(|| Error::format("encrypted file, but the tensor header has no crypt info"))?;
        let keys = self
            .opts
            .base
            .keys
            .as_ref()
            .ok_or_else(|| Error::crypto("Tensor is encrypted, but decryption was not requested"))?;
        let step = sealed_step(self.pool.chunk());
        let sealed = match DecryptPlan::new_until(keys, info, e.data_length, &crate::storage::load_stopped)? {
            Some(plan) => {
                let cs = plan.pieces()[0].range.len();
                // Each read must hold whole cipher chunks of this size.
                if plan.pieces().len() > 1 && step % cs == 0 {
                    Sealed::Chunks { plan, chunk: cs }
                } else {
                    Sealed::Whole
                }
            }
            None => Sealed::Whole,
        };
        *s.header.lock().unwrap_or_else(|p| p.into_inner()) = header;
        let sealed = std::sync::Arc::new(sealed);
        *guard = Some(sealed.clone());
        Ok(sealed)
    }

    /// `len` bytes at `offset` of an encrypted tensor: read into staging buffers, each cipher
    /// chunk opened in place, then copied.
    fn sealed_piece(&self, slot: usize, offset: u64, len: u64, stream: StreamHandle) -> Result<()> {
        let sealed = self.sealed(slot)?;
        let (plan, cs) = match &*sealed {
            Sealed::Chunks { plan, chunk } => (plan, *chunk),
            Sealed::Whole if offset == 0 => return self.whole(slot, stream),
            Sealed::Whole => return Ok(()),
        };
        let e = self.entry(slot);
        let step = sealed_step(self.pool.chunk()) as u64;
        let mut off = 0;
        while off < len {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let n = step.min(len - off) as usize;
            let at = offset + off;
            let (mut st, delta) = self.read_staged(e.data_offset + at, n)?;
            let data = &mut st.slice_mut(delta + n)[delta..];
            // `at` is a multiple of `step`, hence of the cipher chunk.
            let first = (at / cs as u64) as usize;
            for (k, part) in data.chunks_mut(cs).enumerate() {
                plan.open_piece(first + k, part)?;
            }
            counters::add(Counter::DecryptedInStaging, n as u64);
            let src = data.as_ptr();
            st.used_on(stream);
            self.copy(slot, at, src, n, stream, Counter::Staged)?;
            off += n as u64;
        }
        self.finish_piece(slot)
    }

    /// One tensor, decrypted and/or hashed on the host before its copy.
    fn whole(&self, slot: usize, stream: StreamHandle) -> Result<()> {
        let e = self.entry(slot);
        let s = &self.slots[slot];
        let mut header = vec![0u8; (e.data_offset - e.header_offset) as usize];
        self.file.source().read_at(e.header_offset, &mut header)?;
        let len = e.data_length as usize;
        let chunk = self.pool.chunk();
        let module_idx = if len == 0 {
            let idx = exec::finalize(self.file, e, &header, &mut [], &self.opts.base)?;
            self.zero(slot, stream)?;
            idx
        } else if len <= chunk {
            let (mut st, delta) = self.read_staged(e.data_offset, len)?;
            let data = &mut st.slice_mut(delta + len)[delta..];
            let idx = exec::finalize(self.file, e, &header, data, &self.opts.base)?;
            let src = data.as_ptr();
            st.used_on(stream);
            self.copy(slot, 0, src, len, stream, Counter::Staged)?;
            idx
        } else if self.file.header.has_crypt_info() {
            // The cipher works on whole tensors here: decrypt in a temporary host buffer.
            let mut tmp = HostBuffer::new(len, false)?;
            self.file.source().read_at(e.data_offset, tmp.as_mut_slice())?;
            self.tally.add(Counter::BufferedRead, len as u64);
            let idx = exec::finalize(self.file, e, &header, tmp.as_mut_slice(), &self.opts.base)?;
            for (k, part) in tmp.as_slice().chunks(chunk).enumerate() {
                let mut st = self.pool.acquire(self.buffers)?;
                st.slice_mut(part.len()).copy_from_slice(part);
                st.used_on(stream);
                self.copy(slot, (k * chunk) as u64, st.ptr(), part.len(), stream, Counter::Staged)?;
            }
            idx
        } else {
            // Hash as the chunks stream through staging.
            let idx = exec::finalize(self.file, e, &header, &mut [], &LoadOptions::default())?;
            let h = TensorHeader::parse(&header, e.wide_shape(), false)?;
            if h.hashes.is_empty() {
                return Err(Error::new(ErrorKind::HashMismatch, "no hashes stored to verify against"));
            }
            let mut hasher = RecordHasher::new(h.hashes.iter().map(|x| x.kind), &h.hashable(&header));
            let mut off = 0;
            while off < len {
                let n = chunk.min(len - off);
                let (mut st, delta) = self.read_staged(e.data_offset + off as u64, n)?;
                let data = &st.slice_mut(delta + n)[delta..];
                hasher.update(data);
                let src = data.as_ptr();
                st.used_on(stream);
                self.copy(slot, off as u64, src, n, stream, Counter::Staged)?;
                off += n;
            }
            for (kind, digest) in hasher.finish() {
                let stored = h.hashes.iter().find(|x| x.kind == kind).expect("hashed kinds come from the header");
                if stored.value != digest {
                    let name = if kind == 0 { "CRC32" } else { "SHA256" };
                    return Err(Error::new(
                        ErrorKind::HashMismatch,
                        format!("{name} hash mismatch: the data is corrupted"),
                    ));
                }
            }
            idx
        };
        s.module_idx.store(module_idx, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_copy_matches_memcpy_at_any_alignment() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for (s_off, d_off, len) in [(0, 0, 0), (1, 3, 31), (5, 0, 128), (3, 17, 4099), (0, 1, 65_000), (9, 31, 33)] {
            let mut dst = vec![0xAAu8; len + 64];
            // SAFETY: both ranges are in bounds.
            unsafe { copy_streaming(dst.as_mut_ptr().add(d_off), src.as_ptr().add(s_off), len) };
            assert_eq!(&dst[d_off..d_off + len], &src[s_off..s_off + len], "{s_off} {d_off} {len}");
            assert!(dst[..d_off].iter().all(|&b| b == 0xAA) && dst[d_off + len..].iter().all(|&b| b == 0xAA));
        }
    }

    #[test]
    fn io_modes_parse() {
        for (s, m) in
            [("auto", IoMode::Auto), ("buffered", IoMode::Buffered), ("direct", IoMode::Direct), ("mmap", IoMode::Mmap)]
        {
            assert_eq!(IoMode::parse(s).unwrap(), m);
        }
        assert_eq!(IoMode::parse("fast").unwrap_err().kind, ErrorKind::Value);
    }

    #[test]
    fn page_alignment_helpers() {
        assert_eq!((align_down(4097), align_up(4097), align_up(4096), align_down(0)), (4096, 8192, 4096, 0));
    }
}
