//! Loads into device memory that the caller already owns (PyTorch allocations, or a module's
//! existing parameters), through the pipeline with staging buffers as its windows.
//!
//! The plan is sized to the staging buffers (`Sizes::device`): small records are read
//! together, large tensors in pieces. Reader threads check a pinned buffer out of the device's
//! pool, read file bytes into it (through the page cache when they are cached, with O_DIRECT
//! when they are not: the local storage backend decides), queue the host→device copy on their
//! stream and hand the buffer back; the pool's events keep a buffer from being overwritten
//! before its copy ran.
//!
//! Ordering with PyTorch: our streams first wait for an event recorded on torch's current
//! stream (so memory torch just allocated or freed is ready), and at the end torch's stream waits
//! for ours; the call also synchronises its streams before returning, so the bytes are in place
//! when it returns and no copy can outlive the destination.
//!
//! Encrypted files, on the GPU (the default where the kernels of `cuda::secretbox` run): the
//! ciphertext travels through staging like plain bytes, in reads of whole 2 MiB cipher chunks,
//! into the destination's own memory; right after a window's copy, the reader queues the
//! kernels that authenticate and decrypt its chunks in place on the same stream. Every chunk
//! has a verdict slot; once the streams are synchronised the verdicts are read back and each
//! tensor checked, so the load returns (and hands out tensors) only when every chunk of every
//! tensor verified. A forged chunk stays ciphertext and fails the load naming the tensor.
//!
//! On the host (`TENSORIZER_RS_GPU_DECRYPT=0`, `verify_hash`, or kernels that cannot run
//! here; the stats say why): large tensors are split into pieces like plain ones, and each 2
//! MiB cipher chunk is authenticated and decrypted in the staging buffer it was read into,
//! right before its copy, so decryption spreads over all readers and overlaps with reads and
//! copies; small ones are opened whole in their segment's buffer. With `verify_hash` large
//! tensors go whole to one reader each (the hash runs over the data in order): hashed as the
//! chunks stream past, an encrypted tensor larger than a buffer decrypted in a temporary host
//! buffer.
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::file::TensorFile;
use super::options::{self, LoadOptions, Sealed, Tuning};
use super::pipeline::{self, Destination, To, Window};
use super::plan::{self, sealed_step};
use crate::crypto::{DecryptPlan, AUTH_FAILED};
use crate::cuda::counters::{self, Counter};
use crate::cuda::secretbox::{DeviceChunk, SecretboxKernels, Verdict, Verdicts};
use crate::cuda::{self, DeviceSpan, Engine, Event, Pool, Staged, StreamHandle};
use crate::error::{Error, Result};
use crate::storage::ReadMode;

/// One tensor to load: index entry `entry` into the device memory `dest`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceTarget {
    pub entry: usize,
    pub dest: DeviceSpan,
}

#[derive(Clone)]
pub struct DeviceOptions {
    /// Readers (`num_readers`), `verify_hash`, decryption keys and `io`, as for host loads.
    pub base: LoadOptions,
    /// CUDA device ordinal.
    pub device: i32,
    /// The stream PyTorch is using (the legacy default stream: `StreamHandle::foreign(0)`).
    pub stream: StreamHandle,
}

/// What one load did.
#[derive(Clone, Debug, Default)]
pub struct DeviceStats {
    pub tensors: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub readers: usize,
    pub staged_bytes: u64,
    pub pageable_bytes: u64,
    pub h2d_copies: u64,
    pub batched_copy_calls: u64,
    pub zero_fills: u64,
    pub direct_read_bytes: u64,
    pub buffered_read_bytes: u64,
    pub staging_chunk: usize,
    pub staging_buffers: usize,
    /// Staging buffers this load could make (`Pool::acquire`'s bound).
    pub load_buffers: usize,
    /// How local reads went: `auto`, `buffered` or `direct` (`Tuning::read_mode`).
    pub read_mode: &'static str,
    /// The source's file system (`tmpfs`, `ext4`, ...; `remote` for URLs).
    pub fs: &'static str,
    /// Processes the defaults were shared among (`LOCAL_WORLD_SIZE`).
    pub local_ranks: usize,
    /// The GPU's NUMA node, where sysfs names it.
    pub numa_node: Option<u32>,
    /// CPUs the readers were pinned to (0: not pinned).
    pub reader_cpus: usize,
    /// Encrypted bytes authenticated and decrypted by the GPU kernels.
    pub decrypted_on_device: u64,
    /// Why an encrypted load decrypted on the host instead (`None`: on the GPU, or not
    /// encrypted), and whether that is because the kernels cannot run here (else by choice).
    pub host_decrypt: Option<(String, bool)>,
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
    options::env().check()?;
    pipeline::check_keys(file, opts.base.keys.as_ref())?;
    let name = file.name();
    let mut total = 0u64;
    for t in targets {
        let e = file
            .entries
            .get(t.entry)
            .ok_or_else(|| Error::value(format!("no tensor at index {}", t.entry)).in_file(name))?;
        let want = e.expected_nbytes().map_err(|err| err.in_tensor(&e.name_lossy()).in_file(name))?;
        if want != t.dest.len() {
            return Err(Error::value(format!("destination holds {} bytes, the tensor needs {want}", t.dest.len()))
                .in_tensor(&e.name_lossy())
                .in_file(name));
        }
        if !t.dest.is_empty() && t.dest.is_null() {
            return Err(Error::value("null destination pointer").in_tensor(&e.name_lossy()).in_file(name));
        }
        total += t.dest.len();
    }
    let engine = Engine::get(opts.device)?;
    let _bound = engine.ctx.bind_scoped()?;
    let pool = engine.pool();
    crate::trace::mark("load_engine", 0, 0);

    let caps = file.source().caps();
    let base = &*opts.base.for_source(caps);
    let encrypted = file.header.has_crypt_info();
    let (seal, host_decrypt) = if encrypted { DeviceSeal::new(&engine, file, targets, base) } else { (Ok(None), None) };
    let seal = seal.map_err(|e| e.in_file(name))?;
    let sealed = match (encrypted, seal.is_some()) {
        (false, _) => Sealed::No,
        (true, true) => Sealed::OnGpu,
        (true, false) => Sealed::OnHost,
    };
    let mut tuning = Tuning::device(base, caps, sealed, &pool);
    let placement = options::gpu_placement(opts.device);
    tuning.cpus = placement.cpus.map(Arc::from);
    let entries: Vec<usize> = targets.iter().map(|t| t.entry).collect();
    // Large tensors go whole where their bytes must pass in order: hashed, or sealed where no
    // cipher chunk fits a read (the pipeline reads sealed data in the same steps).
    let whole = base.verify_hash || (encrypted && sealed_step(tuning.fill.min(pool.chunk())) == 0);
    let mut plan = plan::build(&file.entries, &entries, tuning.sizes, |_| whole);
    if let Some(min) = tuning.taper {
        plan.taper(tuning.readers, min);
    }
    crate::trace::mark("load_planned", plan.items.len() as u64, 0);

    // Copies start only after the work already queued on torch's stream.
    let ordered = (|| -> Result<()> {
        let ev = Event::new()?;
        ev.record(opts.stream)?;
        for s in engine.streams() {
            ev.wait_on(s)?;
        }
        Ok(())
    })();
    ordered.map_err(|e| e.in_file(name))?;

    let gpu = Gpu {
        engine: &engine,
        pool: pool.clone(),
        device: opts.device,
        spans: targets.iter().map(|t| t.dest).collect(),
        buffers: tuning.buffers,
        tally: Tally::default(),
        seal,
    };
    let done = &gpu.tally.done;
    let mut tick = progress.as_mut().map(|cb| move || cb(done.load(Ordering::Relaxed), total));
    let tick = tick.as_mut().map(|t| t as &mut dyn FnMut() -> Result<()>);
    let ran = pipeline::run(file, &gpu, &entries, base, &tuning, plan, tick);

    // Whatever happened, no copy may outlive this call: torch's stream waits for ours, and we
    // wait for them too.
    crate::trace::mark("readers_done", total, 0);
    let finished = finish(&engine, opts.stream);
    crate::trace::mark("load_end", total, 0);
    let (module_idx, readers) = ran?;
    finished.map_err(|e| e.in_file(name))?;
    // No tensor is handed out before every one of its cipher chunks verified.
    if let Some(seal) = &gpu.seal {
        seal.check(&engine, file, targets).map_err(|e| e.in_file(name))?;
    }
    if let Some(cb) = progress.as_mut() {
        cb(total, total)?;
    }
    counters::add(Counter::Loads, 1);
    counters::add(Counter::BytesToDevice, total);
    let t = &gpu.tally;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let stats = DeviceStats {
        tensors: targets.len(),
        bytes: total,
        seconds: started.elapsed().as_secs_f64(),
        readers,
        staged_bytes: get(&t.staged),
        pageable_bytes: get(&t.pageable),
        h2d_copies: get(&t.copies),
        batched_copy_calls: get(&t.batch_calls),
        zero_fills: get(&t.zero_fills),
        direct_read_bytes: get(&t.direct),
        buffered_read_bytes: get(&t.buffered),
        staging_chunk: pool.chunk(),
        staging_buffers: pool.max_buffers(),
        load_buffers: tuning.buffers.min(pool.max_buffers()),
        read_mode: match tuning.read_mode {
            ReadMode::Auto => "auto",
            ReadMode::Buffered => "buffered",
            ReadMode::Direct => "direct",
        },
        fs: if caps.remote { "remote" } else { caps.fs.name() },
        local_ranks: tuning.ranks,
        numa_node: placement.node,
        reader_cpus: tuning.cpus.as_ref().map_or(0, |c| c.len()),
        decrypted_on_device: get(&t.on_device),
        host_decrypt,
    };
    Ok((module_idx, stats))
}

/// Start page-locking, in the background, the staging buffers of device `device` that a load
/// of `uri` with `readers` readers will take (see [`options::prewarm_buffers`]); a load that
/// starts meanwhile takes them as they come. Returns at once; failures are left to the load.
pub fn prewarm(device: i32, uri: Option<&str>, readers: Option<usize>) {
    let buffers = options::prewarm_buffers(uri, readers);
    if !matches!(cuda::device_count(), Ok(n) if n > 0) {
        return;
    }
    std::thread::spawn(move || {
        if let Ok(engine) = Engine::get(device) {
            crate::trace::mark("prewarm_engine", 0, 0);
            // The page-locking threads inherit this one's CPUs: the buffers are first touched,
            // so placed, on the GPU's NUMA node, like the readers that fill them.
            if let Some(cpus) = options::gpu_placement(device).cpus {
                super::numa::pin_current_thread(&cpus);
            }
            engine.pool().prewarm(buffers);
        }
    });
}

fn finish(engine: &Engine, torch_stream: StreamHandle) -> Result<()> {
    let mut first = None;
    for s in engine.streams() {
        let r = Event::new().and_then(|ev| {
            ev.record(s)?;
            ev.wait_on(torch_stream)
        });
        let synced = s.synchronize();
        if first.is_none() {
            first = r.err().or(synced.err());
        }
    }
    first.map_or(Ok(()), Err)
}

/// Per-load tallies, mirrored into the process-wide counters.
#[derive(Default)]
struct Tally {
    staged: AtomicU64,
    pageable: AtomicU64,
    copies: AtomicU64,
    batch_calls: AtomicU64,
    zero_fills: AtomicU64,
    direct: AtomicU64,
    buffered: AtomicU64,
    on_device: AtomicU64,
    /// Bytes whose copy (or zero fill) has been queued, for progress reports.
    done: AtomicU64,
}

impl Tally {
    fn add(&self, c: Counter, n: u64) {
        let cell = match c {
            Counter::Staged => &self.staged,
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

/// A GPU as the pipeline's destination.
struct Gpu<'a> {
    engine: &'a Arc<Engine>,
    pool: Arc<Pool>,
    device: i32,
    spans: Vec<DeviceSpan>,
    /// Staging buffers this load may make (`Pool::acquire`).
    buffers: usize,
    tally: Tally,
    /// Encrypted tensors are opened in place by the GPU kernels.
    seal: Option<DeviceSeal>,
}

/// How a load opens encrypted tensors on the device: the kernels, one verdict slot per cipher
/// piece, and each tensor's slots.
struct DeviceSeal {
    kernels: Arc<SecretboxKernels>,
    verdicts: Verdicts,
    /// Per target: its first verdict slot and piece count, taken when its first bytes are
    /// opened.
    slots: Vec<OnceLock<(u32, u32)>>,
    next: AtomicU32,
}

impl DeviceSeal {
    /// The kernels and verdict slots for an encrypted load, where the options allow GPU
    /// decryption and the kernels run here; otherwise `None` and why (and whether because the
    /// kernels cannot run). An error only where the device fails.
    #[allow(clippy::type_complexity)]
    fn new(
        engine: &Engine,
        file: &TensorFile,
        targets: &[DeviceTarget],
        opts: &LoadOptions,
    ) -> (Result<Option<DeviceSeal>>, Option<(String, bool)>) {
        if let Err(why) = options::gpu_decrypt(opts) {
            return (Ok(None), Some((why, false)));
        }
        let kernels = match SecretboxKernels::get(engine.ctx.ordinal) {
            Ok(k) => k,
            Err(e) => {
                return (Ok(None), Some((format!("the GPU decryption kernels cannot run here: {}", e.message), true)))
            }
        };
        // Each MAC takes 16 bytes of its tensor's header, and covers at least one byte: a bound
        // on the pieces, known before any header is read (linear in the file's size).
        let mut bound = 0u64;
        for t in targets {
            let e = &file.entries[t.entry];
            if e.data_length > 0 {
                bound += (e.data_offset.saturating_sub(e.header_offset) / 16 + 1).min(e.data_length);
            }
        }
        let Ok(n) = u32::try_from(bound) else {
            return (Err(Error::format("too many cipher chunks for one load")), None);
        };
        let seal = Verdicts::new(&engine.ctx, n as usize).map(|verdicts| {
            Some(DeviceSeal {
                kernels,
                verdicts,
                slots: targets.iter().map(|_| OnceLock::new()).collect(),
                next: AtomicU32::new(0),
            })
        });
        (seal, None)
    }

    /// After the load's streams are synchronised: every piece of every encrypted tensor read
    /// authentic, else the first tensor that did not fails the load.
    fn check(&self, engine: &Engine, file: &TensorFile, targets: &[DeviceTarget]) -> Result<()> {
        let stream = engine.streams().next().expect("at least one stream");
        let verdicts = self.verdicts.read(stream)?;
        for (t, slots) in targets.iter().zip(&self.slots) {
            let e = &file.entries[t.entry];
            if e.data_length == 0 {
                continue;
            }
            let ok = match slots.get() {
                Some(&(base, n)) => verdicts
                    .get(base as usize..(base + n) as usize)
                    .is_some_and(|v| v.iter().all(|v| *v == Verdict::Authentic)),
                None => false,
            };
            if !ok {
                return Err(Error::crypto(AUTH_FAILED).in_tensor(&e.name_lossy()));
            }
        }
        Ok(())
    }
}

/// A reader's copy stream.
struct Lane {
    stream: StreamHandle,
}

enum GpuWindow {
    Staged(Staged),
    /// Ordinary memory for a read larger than a staging buffer (a segment whose one header is
    /// that large): copied from pageable memory.
    Heap(Vec<u8>),
}

impl Window for GpuWindow {
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            GpuWindow::Staged(st) => {
                let cap = st.capacity();
                st.slice_mut(cap)
            }
            GpuWindow::Heap(v) => v,
        }
    }
}

impl Gpu<'_> {
    /// Queue the kernels that open `chunks` (in the destinations, copied on `lane`'s stream).
    fn launch(
        &self,
        seal: &DeviceSeal,
        key: &[u8; crate::crypto::KEY_LEN],
        chunks: &[DeviceChunk],
        lane: &Lane,
    ) -> Result<()> {
        // SAFETY: each chunk lies in its tensor's destination (checked by the caller), whose
        // ciphertext copies were queued on this stream before; nothing else writes it until the
        // load's streams are synchronised.
        unsafe { seal.kernels.open_in_place(key, chunks, &seal.verdicts, lane.stream)? };
        self.tally.on_device.fetch_add(chunks.iter().map(|c| c.len).sum(), Ordering::Relaxed);
        Ok(())
    }

    fn queued(&self, kind: Counter, bytes: u64, copies: u64) {
        self.tally.add(kind, bytes);
        self.tally.add(Counter::Copies, copies);
        self.tally.done.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Destination for Gpu<'_> {
    type Lane = Lane;
    type Window = GpuWindow;
    const KEEPS_WHOLE: bool = false;
    const POOLED: bool = true;
    const READER: &'static str = "tz-gpu-read";

    fn lane(&self, reader: usize) -> Result<Lane> {
        self.engine.ctx.bind()?;
        let streams = self.engine.streams();
        let n = streams.len();
        Ok(Lane { stream: self.engine.streams().nth(reader % n).expect("at least one stream") })
    }
    fn reader_done(&self) {
        counters::add_thread_cpu(Counter::ReaderCpu);
    }
    fn window_cap(&self) -> usize {
        self.pool.chunk()
    }
    fn window(&self, _lane: &mut Lane, _to: To, len: usize) -> Result<GpuWindow> {
        if len <= self.pool.chunk() {
            Ok(GpuWindow::Staged(self.pool.acquire(self.buffers)?))
        } else {
            Ok(GpuWindow::Heap(vec![0u8; len]))
        }
    }
    fn place(&self, lane: &mut Lane, w: GpuWindow, at: usize, slot: usize, offset: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let dst = self.spans[slot].sub(offset, len as u64)?;
        match w {
            GpuWindow::Staged(mut st) => {
                st.copy_to(at..at + len, dst, lane.stream)?;
                self.queued(Counter::Staged, len as u64, 1);
            }
            GpuWindow::Heap(v) => {
                dst.copy_from_pageable(&v[at..at + len], lane.stream)?;
                self.queued(Counter::Pageable, len as u64, 1);
            }
        }
        Ok(())
    }
    fn place_parts(&self, lane: &mut Lane, w: GpuWindow, at: usize, parts: &[(usize, Range<usize>)]) -> Result<()> {
        if parts.is_empty() {
            return Ok(());
        }
        let bytes: usize = parts.iter().map(|(_, r)| r.len()).sum();
        match w {
            GpuWindow::Staged(mut st) => {
                let copies: Vec<(Range<usize>, DeviceSpan)> =
                    parts.iter().map(|(slot, r)| (at + r.start..at + r.end, self.spans[*slot])).collect();
                // The segment's copies go to the driver together (one batched call where supported).
                if st.copy_many_to(&copies, self.device, lane.stream)? {
                    self.tally.add(Counter::BatchCalls, 1);
                }
                self.queued(Counter::Staged, bytes as u64, parts.len() as u64);
            }
            GpuWindow::Heap(v) => {
                for (slot, r) in parts {
                    self.spans[*slot].copy_from_pageable(&v[at + r.start..at + r.end], lane.stream)?;
                }
                self.queued(Counter::Pageable, bytes as u64, parts.len() as u64);
            }
        }
        Ok(())
    }
    fn zero(&self, lane: &mut Lane, slot: usize) -> Result<()> {
        let span = self.spans[slot];
        if !span.is_empty() {
            span.zero(lane.stream)?;
            self.tally.add(Counter::ZeroFills, 1);
            self.tally.done.fetch_add(span.len(), Ordering::Relaxed);
        }
        Ok(())
    }
    fn read_done(&self, n: u64, direct: bool) {
        self.tally.add(if direct { Counter::DirectRead } else { Counter::BufferedRead }, n);
    }
    fn opened(&self, n: u64) {
        counters::add(Counter::DecryptedInStaging, n);
    }
    fn opens_placed(&self) -> bool {
        self.seal.is_some()
    }
    fn open_placed(&self, lane: &mut Lane, what: &[(usize, &DecryptPlan, Range<usize>)]) -> Result<()> {
        let seal = self.seal.as_ref().ok_or_else(|| Error::io("internal error: no GPU decryption"))?;
        let mut batch: Vec<DeviceChunk> = Vec::new();
        let mut key = None;
        for (slot, plan, range) in what {
            let pieces = plan.pieces();
            let n = pieces.len() as u32;
            let &(base, _) = seal.slots[*slot].get_or_init(|| (seal.next.fetch_add(n, Ordering::Relaxed), n));
            // The pieces that make up `range`, exactly.
            let first = pieces.partition_point(|p| p.range.start < range.start);
            let mut end = first;
            let mut at = range.start;
            while at < range.end {
                match pieces.get(end) {
                    Some(p) if p.range.start == at && p.range.end <= range.end => at = p.range.end,
                    _ => return Err(Error::io("internal error: placed bytes are not whole cipher chunks")),
                }
                end += 1;
            }
            let span = self.spans[*slot];
            span.sub(range.start as u64, range.len() as u64)?;
            // Tensors of one launch share its key (files from a passphrase may hold several).
            if key.is_some_and(|k| k != plan.key()) {
                self.launch(seal, key.expect("checked"), &batch, lane)?;
                batch.clear();
            }
            key = Some(plan.key());
            batch.extend(DeviceChunk::from_pieces(span.ptr(), &pieces[first..end], base + first as u32));
        }
        match key {
            Some(k) if !batch.is_empty() => self.launch(seal, k, &batch, lane),
            _ => Ok(()),
        }
    }
    unsafe fn landed(&self, _slot: usize) -> &mut [u8] {
        unreachable!("a GPU load opens its bytes on their way; no tensor lands whole in host memory")
    }
}
