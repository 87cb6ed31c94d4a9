//! A bounded pool of pinned staging buffers. Readers check a buffer out, read file bytes into
//! it, queue its host→device copy, and hand it back with an event recorded after that copy;
//! the next user waits on the event before overwriting it. Buffers are allocated on demand up
//! to the configured total and kept for later loads.
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::counters::{self, Counter};
use super::{result, Context, DeviceSpan, Event, PinnedBuf, StagingConfig, StreamHandle};
use crate::error::{Error, Result};

/// Room kept free in every buffer so an O_DIRECT read of a chunk can start and end on 4 KiB
/// boundaries around it: a buffer of `chunk` bytes takes reads of `chunk - SLACK` bytes.
pub const SLACK: usize = 2 * 4096;

struct Slot {
    buf: PinnedBuf,
    event: Event,
    /// A copy out of this buffer may still be running until `event` completes.
    pending: bool,
}

struct State {
    free: VecDeque<Slot>,
    allocated: usize,
}

pub struct Pool {
    ctx: Context,
    cfg: StagingConfig,
    max_buffers: usize,
    state: Mutex<State>,
    cond: Condvar,
}

impl Pool {
    pub fn new(ctx: Context, cfg: StagingConfig) -> Self {
        let max_buffers = (cfg.total / cfg.chunk).max(1);
        Pool {
            ctx,
            cfg,
            max_buffers,
            state: Mutex::new(State { free: VecDeque::new(), allocated: 0 }),
            cond: Condvar::new(),
        }
    }

    pub fn config(&self) -> StagingConfig {
        self.cfg
    }

    /// Bytes one read may fill (the buffer less the alignment slack).
    pub fn chunk(&self) -> usize {
        self.cfg.chunk - SLACK
    }

    pub fn max_buffers(&self) -> usize {
        self.max_buffers
    }

    /// Check out a buffer, waiting for one if all are in use. A new buffer is made only while
    /// fewer than `grow_to` exist (buffers still being made by `prewarm` count): a local load
    /// passes its reader count, since each reader holds one buffer at a time. More buffers than
    /// readers only spread the copies over more memory: on an H100 host, loads whose readers
    /// made buffers beside the prewarm's (144–192 MiB in all) ran at 33–38 GB/s against 39–46
    /// with 96 MiB, their readers spending 5.2–6.1 CPU-seconds against 4.4–5.0
    /// (docs/benchmarks.md). The calling thread must have the pool's context current.
    pub fn acquire(self: &Arc<Self>, grow_to: usize) -> Result<Staged> {
        let grow_to = grow_to.clamp(1, self.max_buffers);
        let slot = loop {
            let reused = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(slot) = st.free.pop_front() {
                        break Some(slot);
                    }
                    if st.allocated < grow_to {
                        st.allocated += 1;
                        break None;
                    }
                    let waited = crate::trace::enabled().then(crate::trace::now_ns);
                    st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                    if let Some(t) = waited {
                        crate::trace::mark("staging_wait", crate::trace::now_ns() - t, 0);
                    }
                }
            };
            if let Some(slot) = reused {
                break slot;
            }
            match self.make() {
                Ok(slot) => break slot,
                Err(e) => {
                    let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.allocated -= 1;
                    // Out of pinned memory: make do with the buffers we have, if any.
                    if st.allocated == 0 {
                        return Err(e);
                    }
                }
            }
        };
        let mut slot = slot;
        if slot.pending {
            let waited = crate::trace::enabled().then(crate::trace::now_ns);
            if let Err(e) = slot.event.synchronize() {
                self.give_back(slot);
                return Err(e);
            }
            if let Some(t) = waited {
                crate::trace::mark("staging_sync", crate::trace::now_ns() - t, 0);
            }
            slot.pending = false;
        }
        counters::add(Counter::StagingInUse, slot.buf.capacity() as u64);
        Ok(Staged { pool: self.clone(), slot: Some(slot), used_on: None })
    }

    /// Allocate idle buffers until `n` exist (at most the pool's bound), on a few threads, so a
    /// load that starts meanwhile takes them as they are made: the first load of a process
    /// otherwise pays for page-locking its buffers one reader at a time. Errors leave the pool
    /// as it was.
    pub fn prewarm(self: &Arc<Self>, n: usize) {
        let todo = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let want = n.min(self.max_buffers).saturating_sub(st.allocated);
            st.allocated += want;
            want
        };
        let threads = prewarm_threads().clamp(1, todo.max(1));
        let left = AtomicUsize::new(todo);
        let take = || left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        let unreserve = || {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).allocated -= 1;
            self.cond.notify_one();
        };
        std::thread::scope(|s| {
            for _ in 0..threads.min(todo) {
                let pin = || {
                    let bound = self.ctx.bind();
                    while take() {
                        match bound.as_ref().map_err(Clone::clone).and_then(|()| self.make()) {
                            Ok(slot) => self.give_back(slot),
                            Err(_) => unreserve(),
                        }
                    }
                    counters::add_thread_cpu(Counter::PinCpu);
                };
                if std::thread::Builder::new().name("tz-pin".into()).spawn_scoped(s, pin).is_err() {
                    break;
                }
            }
        });
        // Threads that could not start: the loads make those buffers when they need them.
        while take() {
            unreserve();
        }
    }

    /// A new buffer of this pool's size, counted in `staging_allocated`.
    fn make(&self) -> Result<Slot> {
        let slot = Slot { buf: PinnedBuf::new(self.cfg.chunk, self.cfg.pinned)?, event: Event::new()?, pending: false };
        counters::add(Counter::StagingAllocated, slot.buf.capacity() as u64);
        crate::trace::mark("staging_made", slot.buf.capacity() as u64, 0);
        Ok(slot)
    }

    fn give_back(&self, slot: Slot) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).free.push_back(slot);
        self.cond.notify_one();
    }
}

/// Threads that page-lock a prewarm's buffers. Faulting in fresh pages is most of the cost
/// (256 MiB: ~50 ms of zeroing, page-locking it ~6 ms), and those threads compete with the
/// file's opening, torch's allocations and the readers starting beside them: a thread per
/// buffer (32) made the constructor 13–25 ms instead of 5–9 with 8, and with 4 instead of 8
/// on 16 cores the readers read more in their first 30 ms in 6 of 6 fresh-process loads,
/// whole loads even (docs/benchmarks.md). A quarter of the cores, 2 to 4.
fn prewarm_threads() -> usize {
    (crate::cores() / 4).clamp(2, 4)
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Freeing pinned memory needs a current context; wait for copies still reading it.
        let _bound = self.ctx.bind_scoped();
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        for slot in st.free.drain(..) {
            if slot.pending {
                let _ = slot.event.synchronize();
            }
            counters::sub(Counter::StagingAllocated, slot.buf.capacity() as u64);
        }
    }
}

/// A checked-out staging buffer. Dropping it returns it to the pool, first recording an event
/// on the stream that copies out of it (see [`Staged::used_on`]).
pub struct Staged {
    pool: Arc<Pool>,
    slot: Option<Slot>,
    used_on: Option<StreamHandle>,
}

impl Staged {
    fn buf(&self) -> &PinnedBuf {
        &self.slot.as_ref().expect("slot present until drop").buf
    }
    pub fn ptr(&self) -> *mut u8 {
        self.buf().ptr()
    }
    /// Usable bytes, slack included.
    pub fn capacity(&self) -> usize {
        self.buf().capacity()
    }
    /// The buffer's first `len` bytes. Refused once a copy out of the buffer was queued: the
    /// bytes are the copy's until it ran (the buffer is written again only after the pool's
    /// next `acquire` waited for that).
    pub fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.capacity(), "staging read larger than its buffer");
        assert!(self.used_on.is_none(), "staging buffer written after its copy was queued");
        // SAFETY: pinned memory of `capacity` bytes, exclusively ours while checked out and
        // before any copy out of it was queued.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), len) }
    }
    /// The buffer's first `len` bytes, read-only (what a copy will send).
    pub fn slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.capacity(), "staging range larger than its buffer");
        // SAFETY: pinned memory of `capacity` bytes, ours while checked out; only read here.
        unsafe { std::slice::from_raw_parts(self.ptr(), len) }
    }

    /// Queue a copy of `self[range]` to `dst` on `stream`. The buffer returns to the pool when
    /// dropped and is handed out again only after the copy ran. All of a buffer's copies go on
    /// one stream.
    pub fn copy_to(&mut self, range: Range<usize>, dst: DeviceSpan, stream: StreamHandle) -> Result<()> {
        let dst = dst.sub(0, range.len() as u64)?;
        self.used_on(stream)?;
        let src = &self.slice(range.end)[range];
        // SAFETY: `dst` is device memory of `src.len()` bytes (a checked sub-span); `src` is
        // pinned memory that no one writes until the event recorded when this buffer goes back
        // to the pool has passed, i.e. until the copy ran.
        unsafe { result::copy_htod(dst.ptr, src, stream.0) }
    }

    /// Queue copies of `self[range]` to each destination: one `cuMemcpyBatchAsync` where the
    /// driver has it (a copy launch costs microseconds, which adds up over thousands of small
    /// tensors), else one call each. Returns whether it batched.
    pub fn copy_many_to(
        &mut self,
        parts: &[(Range<usize>, DeviceSpan)],
        device: i32,
        stream: StreamHandle,
    ) -> Result<bool> {
        if parts.len() > 1 && batch_usable() {
            let mut dsts = Vec::with_capacity(parts.len());
            let mut srcs = Vec::with_capacity(parts.len());
            let mut sizes = Vec::with_capacity(parts.len());
            let end = parts.iter().map(|(r, _)| r.end).max().unwrap_or(0);
            let base = self.slice(end).as_ptr() as u64;
            for (range, dst) in parts {
                dsts.push(dst.sub(0, range.len() as u64)?.ptr);
                srcs.push(base + range.start as u64);
                sizes.push(range.len());
            }
            self.used_on(stream)?;
            // SAFETY: as for `copy_to`, for every element (ranges checked against the buffer,
            // destinations against their spans).
            match unsafe { result::copy_htod_batch(&mut dsts, &mut srcs, &mut sizes, device, stream.0) } {
                Ok(()) => return Ok(true),
                // Unsupported here: never try again; redo these one by one (copies are idempotent).
                Err(_) => BATCH_FAILED.store(true, Ordering::Relaxed),
            }
        }
        for (range, dst) in parts {
            self.copy_to(range.clone(), *dst, stream)?;
        }
        Ok(false)
    }

    /// Note that copies out of this buffer go on `stream`.
    fn used_on(&mut self, stream: StreamHandle) -> Result<()> {
        match self.used_on {
            Some(s) if s != stream => Err(Error::io("internal error: one staging buffer copied on two streams")),
            _ => {
                self.used_on = Some(stream);
                Ok(())
            }
        }
    }
}

/// Whether `cuMemcpyBatchAsync` (drivers for CUDA 12.8+) may be used: present in the loaded
/// driver and not failed before.
fn batch_usable() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(result::has_batch) && !BATCH_FAILED.load(Ordering::Relaxed)
}

static BATCH_FAILED: AtomicBool = AtomicBool::new(false);

impl Drop for Staged {
    fn drop(&mut self) {
        let Some(mut slot) = self.slot.take() else { return };
        counters::sub(Counter::StagingInUse, slot.buf.capacity() as u64);
        if let Some(stream) = self.used_on {
            if slot.event.record(stream).is_ok() {
                slot.pending = true;
            } else {
                // Cannot track the copy: wait for the whole stream instead.
                let _ = stream.synchronize();
            }
        }
        self.pool.give_back(slot);
    }
}
