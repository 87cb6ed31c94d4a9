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
//! Encrypted files: large tensors are split into pieces like plain ones, and each 2 MiB cipher
//! chunk is authenticated and decrypted in the staging buffer it was read into, right before
//! its copy, so decryption spreads over all readers and overlaps with reads and copies; small
//! ones are opened whole in their segment's buffer. With `verify_hash` large tensors go whole
//! to one reader each (the hash runs over the data in order): hashed as the chunks stream past,
//! an encrypted tensor larger than a buffer decrypted in a temporary host buffer.
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::file::TensorFile;
use super::options::{self, LoadOptions, Tuning};
use super::pipeline::{self, Destination, To, Window};
use super::plan::{self, sealed_step};
use crate::cuda::counters::{self, Counter};
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
    let mut tuning = Tuning::device(base, caps, encrypted, &pool);
    let placement = options::gpu_placement(opts.device);
    tuning.cpus = placement.cpus.map(Arc::from);
    let entries: Vec<usize> = targets.iter().map(|t| t.entry).collect();
    // Large tensors go whole where their bytes must pass in order: hashed, or sealed where no
    // cipher chunk fits a buffer.
    let whole = base.verify_hash || (encrypted && sealed_step(pool.chunk()) == 0);
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
    unsafe fn landed(&self, _slot: usize) -> &mut [u8] {
        unreachable!("a GPU load opens its bytes on their way; no tensor lands whole in host memory")
    }
}
