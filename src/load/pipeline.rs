//! The one load pipeline: plan → read into buffers → verify / decrypt → place.
//!
//! Reader threads take the plan's items in file order. Each reads its bytes into a window that
//! the destination lends (host loads: the tensor's own memory, or a scratch buffer for a
//! segment of small records; GPU loads: a pinned staging buffer), opens them there when they
//! must be opened before they leave (decryption and hashing on the GPU path), and hands the
//! window back to be placed (nothing to do in host memory; a host→device copy for a GPU). The
//! reader that finishes a tensor's last item completes it: its header was checked against the
//! index when it arrived; a destination that keeps whole tensors in host memory decrypts and
//! hashes them there, once. One loop, one failure path (the first error stops every read
//! through one [`Stop`]), one header check, one hash check, whatever the destination.
//!
//! A destination that authenticates and decrypts on the device ([`Destination::opens_placed`])
//! gets sealed bytes as they are: each window is placed, then its whole cipher chunks are
//! opened where they landed ([`Destination::open_placed`], queued after the copy); the
//! destination checks every chunk's verdict before the load returns.
use std::ops::Range;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::file::TensorFile;
use super::options::{LoadOptions, Tuning};
use super::plan::{sealed_step, Item, Plan, SegmentPart};
use crate::buffer::HostBuffer;
use crate::crypto::{DecryptPlan, DecryptionKeys};
use crate::error::{Error, ErrorKind, Result};
use crate::format::hash::RecordHasher;
use crate::format::{IndexEntry, TensorHeader};
use crate::storage::{Caps, SliceDest, Stop, StreamDest};

/// Memory one read lands in.
pub(crate) trait Window: Send {
    /// The window's bytes: at least what the read asked for (a staging buffer: all of it, so an
    /// aligned direct read has room around the bytes).
    fn bytes(&mut self) -> &mut [u8];
}

/// Where a load's tensors go, and the memory their bytes pass through.
pub(crate) trait Destination: Sync {
    /// Per-reader state (a GPU reader's copy stream; a host reader's scratch buffer).
    type Lane: Send;
    type Window: Window;
    /// A tensor's bytes all sit in host memory once its items are done (host loads): it is
    /// decrypted and hashed there, whole, by the reader that finishes it. Otherwise every
    /// window is opened before it is placed, and a tensor that must be hashed goes whole to one
    /// reader, in order.
    const KEEPS_WHOLE: bool;
    /// Windows come from a bounded pool: a remote read takes its window only once bytes arrive
    /// (a reader holding one while it waits for one of the source's request slots could leave
    /// the slot holders waiting for windows forever), and a large piece is one request whose
    /// body streams through several windows.
    const POOLED: bool;
    /// Reader threads are named this, numbered.
    const READER: &'static str;

    fn lane(&self, reader: usize) -> Result<Self::Lane>;
    /// A reader is done (after its last item or its error).
    fn reader_done(&self) {}
    /// The most bytes one window holds.
    fn window_cap(&self) -> usize;
    /// A window for `len` bytes bound for `to`.
    fn window(&self, lane: &mut Self::Lane, to: To, len: usize) -> Result<Self::Window>;
    /// `w[at..at + len]` holds tensor `slot`'s data from `offset` on: put it there.
    fn place(
        &self,
        lane: &mut Self::Lane,
        w: Self::Window,
        at: usize,
        slot: usize,
        offset: u64,
        len: usize,
    ) -> Result<()>;
    /// `w` holds a segment from `at` on; each part's bytes (`range`, relative to the segment's
    /// start) are all of that tensor's data.
    fn place_parts(
        &self,
        lane: &mut Self::Lane,
        w: Self::Window,
        at: usize,
        parts: &[(usize, Range<usize>)],
    ) -> Result<()>;
    /// Tensor `slot` has no data in the file (a meta tensor): zeros.
    fn zero(&self, lane: &mut Self::Lane, slot: usize) -> Result<()>;
    /// `n` bytes were read (`direct`: past the page cache).
    fn read_done(&self, _n: u64, _direct: bool) {}
    /// `n` bytes of sealed data were opened in a window, a cipher chunk at a time.
    fn opened(&self, _n: u64) {}
    /// Tensor `slot`'s data, whole, in host memory (only where [`Self::KEEPS_WHOLE`]).
    ///
    /// # Safety
    /// Every item of the tensor is done and the caller is its only user from now on.
    #[allow(clippy::mut_from_ref)]
    unsafe fn landed(&self, slot: usize) -> &mut [u8];
    /// Tensor `slot` is complete: its header checked, its bytes placed and verified.
    fn tensor_done(&self, _slot: usize) -> Result<()> {
        Ok(())
    }
    /// Sealed data is placed as it is and opened where it lands ([`Self::open_placed`]), not
    /// in the windows (asked once per load).
    fn opens_placed(&self) -> bool {
        false
    }
    /// Open sealed data already placed, after the placements queued on `lane`: each entry is a
    /// tensor slot, its decryption plan and a range of its data made of whole cipher pieces.
    fn open_placed(&self, _lane: &mut Self::Lane, _what: &[(usize, &DecryptPlan, Range<usize>)]) -> Result<()> {
        Err(Error::io("internal error: this destination does not open placed data"))
    }
}

/// What a window is for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum To {
    /// A segment of small records (headers and data of several tensors).
    Segment,
    /// Tensor `slot`'s data from `offset` on.
    Tensor { slot: usize, offset: u64 },
}

/// Check that the keys fit the file before any data is read.
pub(crate) fn check_keys(file: &TensorFile, keys: Option<&DecryptionKeys>) -> Result<()> {
    match (file.header.has_crypt_info(), keys.is_some()) {
        (true, false) => Err(Error::crypto(
            "the file is encrypted, but no decryption key was given (pass encryption=DecryptionParams...)",
        )),
        (false, true) => Err(Error::crypto("decryption was requested, but the file is not encrypted")),
        _ => Ok(()),
    }
    .map_err(|e| e.in_file(file.name()))
}

/// A tensor's record header: its bytes, parsed and checked against the index, and how to
/// open its data.
pub(crate) struct Header {
    bytes: Vec<u8>,
    parsed: TensorHeader,
    seal: Option<DecryptPlan>,
}

impl Header {
    /// A key derivation the header needs gives up once `stop` is set.
    fn new(
        file: &TensorFile,
        e: &IndexEntry,
        bytes: &[u8],
        keys: Option<&DecryptionKeys>,
        stop: &Stop,
    ) -> Result<Header> {
        let h = TensorHeader::parse(bytes, e.wide_shape(), file.header.has_crypt_info())?;
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
        let seal = match &h.crypt {
            None => None,
            Some(info) => match info.cipher()? {
                Some(_) => {
                    let keys =
                        keys.ok_or_else(|| Error::crypto("Tensor is encrypted, but decryption was not requested"))?;
                    DecryptPlan::new_until(keys, info, e.data_length, &|| stop.is_stopped())?
                }
                None if e.data_length > 0 => {
                    return Err(Error::crypto("Tensor is not encrypted, but decryption was requested"))
                }
                None => None,
            },
        };
        Ok(Header { bytes: bytes.to_vec(), parsed: h, seal })
    }

    /// The cipher chunk size, where reads of `step` bytes each hold whole chunks of it (so each
    /// piece opens its own); `None` where the tensor must be opened whole (one MAC over all
    /// of it, or chunks that do not tile the reads).
    fn chunk(&self, step: usize) -> Option<usize> {
        let plan = self.seal.as_ref()?;
        let cs = plan.pieces()[0].range.len();
        (plan.pieces().len() > 1 && step > 0 && step % cs == 0).then_some(cs)
    }
}

/// The hash check: the stored hashes of a record against its hashable header and data, fed in
/// order.
struct Verifier<'h> {
    hasher: RecordHasher,
    header: &'h TensorHeader,
}

impl<'h> Verifier<'h> {
    fn new(h: &'h Header) -> Result<Self> {
        let header = &h.parsed;
        if header.hashes.is_empty() {
            return Err(Error::new(ErrorKind::HashMismatch, "no hashes stored to verify against"));
        }
        let hasher = RecordHasher::new(header.hashes.iter().map(|x| x.kind), &header.hashable(&h.bytes));
        Ok(Verifier { hasher, header })
    }
    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
    }
    fn check(self) -> Result<()> {
        for (kind, digest) in self.hasher.finish() {
            let stored = self.header.hashes.iter().find(|x| x.kind == kind).expect("hashed kinds come from the header");
            if stored.value != digest {
                let name = if kind == 0 { "CRC32" } else { "SHA256" };
                return Err(Error::new(
                    ErrorKind::HashMismatch,
                    format!("{name} hash mismatch: the data is corrupted"),
                ));
            }
        }
        Ok(())
    }
}

struct Tensor {
    entry: usize,
    /// Items not done yet; the one that takes this to zero completes the tensor.
    remaining: AtomicUsize,
    header: Mutex<Option<Arc<Header>>>,
    module_idx: AtomicU16,
}

/// One load: the plan, its progress and its first error.
struct Job<'a, D: Destination> {
    file: &'a TensorFile,
    dest: &'a D,
    opts: &'a LoadOptions,
    tuning: &'a Tuning,
    caps: Caps,
    tensors: Vec<Tensor>,
    plan: Plan,
    next: AtomicUsize,
    stop: Stop,
    first_error: Mutex<Option<Error>>,
    /// Tensors are sealed and the destination opens them on the way.
    sealed: bool,
    /// Bytes of sealed data per read: whole cipher chunks that fit a window.
    step: usize,
    /// Sealed data is opened by the destination once placed ([`Destination::opens_placed`]).
    on_device: bool,
}

/// How often the thread that started a load runs its `tick` while the readers work.
pub const TICK: Duration = Duration::from_millis(100);

/// Counts a reader out when it ends, however it ends, so the thread waiting for the readers
/// cannot wait forever.
struct ReaderExit<'a> {
    active: &'a Mutex<usize>,
    wake: &'a Condvar,
}

impl Drop for ReaderExit<'_> {
    fn drop(&mut self) {
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.wake.notify_all();
    }
}

/// Run `plan` over the tensors `entries` (slot `i` is index entry `entries[i]`) into `dest`;
/// returns each slot's module index and the readers that ran. `tick` runs on the calling
/// thread about every [`TICK`] while the readers work; an error from it stops the load (the
/// bindings check Python's signals there, so Ctrl-C works).
pub(crate) fn run<D: Destination>(
    file: &TensorFile,
    dest: &D,
    entries: &[usize],
    opts: &LoadOptions,
    tuning: &Tuning,
    plan: Plan,
    mut tick: Option<&mut dyn FnMut() -> Result<()>>,
) -> Result<(Vec<u16>, usize)> {
    let name = file.name().to_string();
    let sealed = file.header.has_crypt_info() && !D::KEEPS_WHOLE;
    let tensors = entries
        .iter()
        .zip(&plan.pieces)
        .map(|(&entry, &pieces)| Tensor {
            entry,
            remaining: AtomicUsize::new(pieces),
            header: Mutex::new(None),
            module_idx: AtomicU16::new(0),
        })
        .collect();
    let readers = tuning.readers.min(plan.items.len().max(1));
    let job = Job {
        file,
        dest,
        opts,
        tuning,
        caps: file.source().caps(),
        tensors,
        plan,
        next: AtomicUsize::new(0),
        stop: Stop::new(),
        first_error: Mutex::new(None),
        sealed,
        step: sealed_step(tuning.fill.min(dest.window_cap())),
        on_device: sealed && !opts.verify_hash && dest.opens_placed(),
    };
    crate::trace::mark("load_start", 0, readers as u64);
    let (active, wake) = (Mutex::new(0usize), Condvar::new());
    std::thread::scope(|s| {
        for w in 0..readers {
            *active.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            let exit = ReaderExit { active: &active, wake: &wake };
            let job = &job;
            let spawned = std::thread::Builder::new().name(format!("{}{w}", D::READER)).spawn_scoped(s, move || {
                let _exit = exit;
                if let Some(cpus) = &job.tuning.cpus {
                    // On the GPU's NUMA node; refused, the reader runs where it would have.
                    super::numa::pin_current_thread(cpus);
                }
                crate::trace::mark("reader_start", w as u64, 0);
                // A panic must end the load with an error, not leave it half done.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.reader(w))) {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => job.fail(e),
                    Err(_) => job.fail(Error::io("internal error: a reader thread panicked")),
                }
                job.dest.reader_done();
                crate::trace::mark("reader_end", w as u64, 0);
            });
            if let Err(e) = spawned {
                // The readers already started finish the plan; none started is an error.
                if w == 0 {
                    job.fail(Error::io(format!("cannot start a reader thread: {e}")));
                }
                break;
            }
        }
        // Wait for every reader, ticking meanwhile (until the load fails).
        let wait = if tick.is_some() { TICK } else { Duration::from_secs(3600) };
        let mut n = active.lock().unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = wake.wait_timeout(n, wait).unwrap_or_else(|p| p.into_inner()).0;
            if *n == 0 || job.stop.is_stopped() {
                continue;
            }
            if let Some(tick) = tick.as_mut() {
                drop(n);
                if let Err(e) = tick() {
                    job.fail(e);
                }
                n = active.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    });
    if let Some(e) = job.first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e.in_file(&name));
    }
    Ok((job.tensors.iter().map(|t| t.module_idx.load(Ordering::Relaxed)).collect(), readers))
}

impl<D: Destination> Job<'_, D> {
    /// The one failure path: keep the first error, stop every read.
    fn fail(&self, e: Error) {
        self.stop.stop();
        self.first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
    }

    fn entry(&self, slot: usize) -> &IndexEntry {
        &self.file.entries[self.tensors[slot].entry]
    }

    fn named(&self, slot: usize) -> impl Fn(Error) -> Error + '_ {
        move |e| e.in_tensor(&self.entry(slot).name_lossy())
    }

    fn reader(&self, w: usize) -> Result<()> {
        let mut lane = self.dest.lane(w)?;
        while !self.stop.is_stopped() {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = self.plan.items.get(i) else { break };
            match item {
                Item::Segment { start, len, parts } => {
                    crate::trace::mark("segment", *start, *len as u64);
                    self.segment(&mut lane, *start, *len, parts)?;
                }
                Item::Piece { slot, file_offset, offset, len } => {
                    crate::trace::mark("piece", *file_offset, *len);
                    self.piece(&mut lane, *slot, *file_offset, *offset, *len).map_err(self.named(*slot))?;
                    crate::trace::mark("piece_end", *file_offset, *len);
                }
                Item::Whole { slot, .. } => {
                    let h = self.header(*slot).map_err(self.named(*slot))?;
                    self.whole(&mut lane, *slot, &h).and_then(|()| self.item_done(*slot)).map_err(self.named(*slot))?;
                }
            }
        }
        Ok(())
    }

    /// Small records read together: each part's header, and its data unless it is read in
    /// pieces. Data bound for a destination that keeps no whole tensors is opened here.
    fn segment(&self, lane: &mut D::Lane, start: u64, len: usize, parts: &[SegmentPart]) -> Result<()> {
        let (mut w, at) = self.fill(lane, To::Segment, start, len).map_err(self.named(parts[0].slot))?;
        let bytes = &mut w.bytes()[at..at + len];
        let mut placed = Vec::with_capacity(parts.len());
        let mut sealed = Vec::new();
        for p in parts {
            let (slot, named) = (p.slot, self.named(p.slot));
            let header = &bytes[p.header.clone()];
            let Some(d) = &p.data else {
                // A large tensor's header: its pieces may be reading it themselves right now.
                self.offer_header(slot, header).map_err(&named)?;
                continue;
            };
            let h = self.set_header(slot, header).map_err(&named)?;
            if d.is_empty() {
                self.dest.zero(lane, slot).map_err(&named)?;
                continue;
            }
            if !D::KEEPS_WHOLE {
                self.open(&h, &mut bytes[d.clone()]).map_err(&named)?;
            }
            if self.on_device && h.seal.is_some() {
                sealed.push((slot, h.clone(), d.len()));
            }
            placed.push((slot, d.clone()));
        }
        self.dest.place_parts(lane, w, at, &placed).map_err(self.named(parts[0].slot))?;
        if !sealed.is_empty() {
            let what: Vec<_> =
                sealed.iter().map(|(slot, h, n)| (*slot, h.seal.as_ref().expect("sealed"), 0..*n)).collect();
            self.dest.open_placed(lane, &what).map_err(self.named(sealed[0].0))?;
        }
        for p in parts {
            self.item_done(p.slot).map_err(self.named(p.slot))?;
        }
        Ok(())
    }

    /// `len` bytes of a large tensor's data at `offset`: in reads of a window's worth, or, from
    /// a remote source into pooled windows, as one request streamed through them.
    fn piece(&self, lane: &mut D::Lane, slot: usize, file_offset: u64, offset: u64, len: u64) -> Result<()> {
        let header = if self.sealed { Some(self.header(slot)?) } else { None };
        let seal = match &header {
            Some(h) => match h.chunk(self.step) {
                Some(cs) => Some((&**h, cs)),
                // The cipher does not split along our reads: the first piece loads the tensor
                // whole, the others only count themselves done.
                None if offset == 0 => return self.whole(lane, slot, h).and_then(|()| self.item_done(slot)),
                None => return self.item_done(slot),
            },
            None => None,
        };
        let per = if seal.is_some() { self.step } else { self.tuning.fill };
        if D::POOLED && self.caps.remote {
            let mut out = Windows {
                job: self,
                lane,
                slot: Some(slot),
                to: To::Segment,
                at: offset,
                per,
                left: len as usize,
                seal,
                cur: None,
                fill: 0,
                want: 0,
            };
            self.file.source().read_stream_into(file_offset, len as usize, &mut out, &self.stop)?;
            out.flush()?;
            self.dest.read_done(len, false);
        } else {
            let mut off = 0;
            while off < len {
                if self.stop.is_stopped() {
                    return Ok(());
                }
                let n = (per as u64).min(len - off) as usize;
                let mut w = self.dest.window(lane, To::Tensor { slot, offset: offset + off }, n)?;
                let at = self.read_into(&mut w, file_offset + off, n)?;
                if let Some((h, cs)) = seal.filter(|_| !self.on_device) {
                    self.open_chunks(h, cs, offset + off, &mut w.bytes()[at..at + n])?;
                }
                self.dest.place(lane, w, at, slot, offset + off, n)?;
                if let Some((h, _)) = seal {
                    self.open_placed(lane, h, slot, (offset + off) as usize, n)?;
                }
                off += n as u64;
            }
        }
        self.item_done(slot)
    }

    /// All of a tensor's data by this reader, in order: decrypted and hashed whole where it
    /// fits a window; larger and sealed, in host memory first; larger and plain, hashed as it
    /// passes through the windows.
    fn whole(&self, lane: &mut D::Lane, slot: usize, h: &Header) -> Result<()> {
        let e = self.entry(slot);
        let (file_offset, len) = (e.data_offset, e.data_length as usize);
        let cap = self.dest.window_cap();
        if len == 0 {
            return self.dest.zero(lane, slot);
        }
        if len <= cap {
            let (mut w, at) = self.fill(lane, To::Tensor { slot, offset: 0 }, file_offset, len)?;
            self.open(h, &mut w.bytes()[at..at + len])?;
            self.dest.place(lane, w, at, slot, 0, len)?;
            return self.open_placed(lane, h, slot, 0, len);
        }
        if h.seal.is_some() && !self.on_device {
            let mut tmp = HostBuffer::new(len, false)?;
            self.file.source().read(file_offset, tmp.as_mut_slice(), &self.stop)?;
            self.dest.read_done(len as u64, false);
            self.open(h, tmp.as_mut_slice())?;
            for (k, part) in tmp.as_slice().chunks(cap).enumerate() {
                let offset = (k * cap) as u64;
                let mut w = self.dest.window(lane, To::Tensor { slot, offset }, part.len())?;
                w.bytes()[..part.len()].copy_from_slice(part);
                self.dest.place(lane, w, 0, slot, offset, part.len())?;
            }
            return Ok(());
        }
        let mut verifier = if self.opts.verify_hash { Some(Verifier::new(h)?) } else { None };
        let mut off = 0;
        while off < len {
            let n = self.tuning.fill.min(cap).min(len - off);
            let to = To::Tensor { slot, offset: off as u64 };
            let (mut w, at) = self.fill(lane, to, file_offset + off as u64, n)?;
            if let Some(v) = verifier.as_mut() {
                v.update(&w.bytes()[at..at + n]);
            }
            self.dest.place(lane, w, at, slot, off as u64, n)?;
            off += n;
        }
        // Sealed and opened on the device: once every copy of it is queued on this lane.
        self.open_placed(lane, h, slot, 0, len)?;
        verifier.map_or(Ok(()), Verifier::check)
    }

    /// One window holding `len` bytes at `file_offset`, and where in it they start.
    fn fill(&self, lane: &mut D::Lane, to: To, file_offset: u64, len: usize) -> Result<(D::Window, usize)> {
        if D::POOLED && self.caps.remote && len <= self.dest.window_cap() {
            let mut one = Windows {
                job: self,
                lane,
                slot: None,
                to,
                at: 0,
                per: len,
                left: len,
                seal: None,
                cur: None,
                fill: 0,
                want: 0,
            };
            self.file.source().read_stream_into(file_offset, len, &mut one, &self.stop)?;
            let taken = one.cur.take();
            self.dest.read_done(len as u64, false);
            let w = match taken {
                Some(w) => w,
                None => self.dest.window(lane, to, len)?,
            };
            return Ok((w, 0));
        }
        let mut w = self.dest.window(lane, to, len)?;
        let at = self.read_into(&mut w, file_offset, len)?;
        Ok((w, at))
    }

    /// Read `len` bytes at `file_offset` into `w`; returns where they start in it.
    fn read_into(&self, w: &mut D::Window, file_offset: u64, len: usize) -> Result<usize> {
        let started = crate::trace::enabled().then(crate::trace::now_ns);
        let source = self.file.source();
        let bytes = w.bytes();
        let (start, direct) = if self.caps.reads_into_buffers {
            // One request whose body goes from the socket straight into the window.
            source.read_stream_into(file_offset, len, &mut SliceDest::new(&mut bytes[..len]), &self.stop)?;
            (0, false)
        } else {
            let landed = source.read_aligned(file_offset, len, bytes, self.tuning.read_mode, &self.stop)?;
            (landed.start, landed.direct)
        };
        self.dest.read_done(len as u64, direct);
        if let Some(t) = started {
            crate::trace::mark("read", crate::trace::now_ns() - t, len as u64);
        }
        Ok(start)
    }

    /// Decrypt (if sealed, unless the destination opens it once placed) and hash-check (with
    /// `verify_hash`) a tensor's whole data.
    fn open(&self, h: &Header, data: &mut [u8]) -> Result<()> {
        if let Some(plan) = h.seal.as_ref().filter(|_| !self.on_device) {
            plan.open_all(data)?;
        }
        if self.opts.verify_hash {
            let mut v = Verifier::new(h)?;
            v.update(data);
            v.check()?;
        }
        Ok(())
    }

    /// Where the destination opens sealed data once placed: queue the opening of tensor
    /// `slot`'s bytes `offset..offset + len` (whole cipher pieces), placed on `lane`.
    fn open_placed(&self, lane: &mut D::Lane, h: &Header, slot: usize, offset: usize, len: usize) -> Result<()> {
        match &h.seal {
            Some(plan) if self.on_device => self.dest.open_placed(lane, &[(slot, plan, offset..offset + len)]),
            _ => Ok(()),
        }
    }

    /// Open the cipher chunks of `data`, the tensor's bytes from `offset` (a multiple of the
    /// chunk size `cs`) on.
    fn open_chunks(&self, h: &Header, cs: usize, offset: u64, data: &mut [u8]) -> Result<()> {
        let plan = h.seal.as_ref().expect("sealed");
        let first = (offset / cs as u64) as usize;
        for (k, part) in data.chunks_mut(cs).enumerate() {
            plan.open_piece(first + k, part)?;
        }
        self.dest.opened(data.len() as u64);
        Ok(())
    }

    /// A large tensor's header as its segment brought it, unless a piece of that tensor is
    /// reading it already (that piece keeps it). A segment must not wait for that read: it
    /// holds a window that the readers owning the source's request slots may be waiting for.
    fn offer_header(&self, slot: usize, bytes: &[u8]) -> Result<()> {
        let mut kept = match self.tensors[slot].header.try_lock() {
            Ok(kept) => kept,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        if kept.is_none() {
            *kept =
                Some(Arc::new(Header::new(self.file, self.entry(slot), bytes, self.opts.keys.as_ref(), &self.stop)?));
        }
        Ok(())
    }

    /// The header of `slot` as its segment brought it (first come, first kept).
    fn set_header(&self, slot: usize, bytes: &[u8]) -> Result<Arc<Header>> {
        let mut kept = self.tensors[slot].header.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = kept.as_ref() {
            return Ok(h.clone());
        }
        let h = Arc::new(Header::new(self.file, self.entry(slot), bytes, self.opts.keys.as_ref(), &self.stop)?);
        *kept = Some(h.clone());
        Ok(h)
    }

    /// The header of `slot`, read now if its segment has not brought it yet (a piece that must
    /// open its bytes before they leave).
    fn header(&self, slot: usize) -> Result<Arc<Header>> {
        let mut kept = self.tensors[slot].header.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = kept.as_ref() {
            return Ok(h.clone());
        }
        let e = self.entry(slot);
        let mut bytes = vec![0u8; (e.data_offset - e.header_offset) as usize];
        self.file.source().read(e.header_offset, &mut bytes, &self.stop)?;
        let h = Arc::new(Header::new(self.file, e, &bytes, self.opts.keys.as_ref(), &self.stop)?);
        *kept = Some(h.clone());
        Ok(h)
    }

    /// One item of `slot` is done; the last one completes the tensor.
    fn item_done(&self, slot: usize) -> Result<()> {
        let t = &self.tensors[slot];
        if t.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        let h = t.header.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let h = h.ok_or_else(|| Error::io("internal error: a tensor completed without its header"))?;
        if D::KEEPS_WHOLE {
            let len = self.entry(slot).data_length as usize;
            // SAFETY: every item of this tensor is done, so this thread is its only user now.
            let data = unsafe { self.dest.landed(slot) };
            self.open(&h, &mut data[..len])?;
        }
        t.module_idx.store(h.parsed.module_idx, Ordering::Relaxed);
        self.dest.tensor_done(slot)
    }
}

/// Lent windows for a streamed read: each takes the next bytes in order; a full one is opened
/// (sealed data) and placed, and the next is taken only when bytes come for it. With no
/// `slot`, one window is filled and kept for the caller.
struct Windows<'j, 'a, D: Destination> {
    job: &'j Job<'a, D>,
    lane: &'j mut D::Lane,
    slot: Option<usize>,
    /// What a kept window is for.
    to: To,
    /// Offset in the tensor of the current window's first byte.
    at: u64,
    /// Bytes per window.
    per: usize,
    /// Bytes of the read not yet in a window.
    left: usize,
    seal: Option<(&'j Header, usize)>,
    cur: Option<D::Window>,
    fill: usize,
    want: usize,
}

impl<D: Destination> Windows<'_, '_, D> {
    /// Place what the current window holds.
    fn flush(&mut self) -> Result<()> {
        let (Some(slot), Some(mut w)) = (self.slot, self.cur.take()) else { return Ok(()) };
        let n = std::mem::take(&mut self.fill);
        if let Some((h, cs)) = self.seal.filter(|_| !self.job.on_device) {
            self.job.open_chunks(h, cs, self.at, &mut w.bytes()[..n])?;
        }
        self.job.dest.place(self.lane, w, 0, slot, self.at, n)?;
        if let Some((h, _)) = self.seal {
            self.job.open_placed(self.lane, h, slot, self.at as usize, n)?;
        }
        crate::trace::mark("flush", n as u64, 0);
        self.at += n as u64;
        Ok(())
    }
}

impl<D: Destination> StreamDest for Windows<'_, '_, D> {
    fn room(&mut self) -> Result<&mut [u8]> {
        if self.job.stop.is_stopped() {
            return Err(Stop::error());
        }
        if (self.cur.is_some() && self.fill == self.want) || (self.cur.is_none() && self.left == 0) {
            return Err(Error::io("a streamed read delivered more bytes than asked for"));
        }
        if self.cur.is_none() {
            self.want = self.per.min(self.left);
            let to = match self.slot {
                Some(slot) => To::Tensor { slot, offset: self.at },
                None => self.to,
            };
            self.cur = Some(self.job.dest.window(self.lane, to, self.want)?);
        }
        let w = self.cur.as_mut().expect("taken above");
        Ok(&mut w.bytes()[self.fill..self.want])
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        self.fill += n;
        self.left -= n;
        if self.fill == self.want && self.slot.is_some() {
            self.flush()?;
        }
        Ok(())
    }

    fn put(&mut self, mut bytes: &[u8]) -> Result<()> {
        // Bytes bound for the device as they are (plain, or sealed ones it opens) are not read by
        // the CPU again: stream them past the caches. Bytes opened or parsed in the window next
        // are copied the ordinary way.
        let streaming = self.slot.is_some() && (self.seal.is_none() || self.job.on_device);
        while !bytes.is_empty() {
            let room = self.room()?;
            let n = bytes.len().min(room.len());
            if streaming {
                crate::buffer::copy_streaming(&mut room[..n], &bytes[..n]);
            } else {
                room[..n].copy_from_slice(&bytes[..n]);
            }
            bytes = &bytes[n..];
            self.advance(n)?;
        }
        Ok(())
    }
}
