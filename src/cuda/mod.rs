//! The CUDA driver, reached through cudarc (`cudarc::driver`), loaded at run time so that the
//! package imports and works on machines without CUDA.
//!
//! cudarc's `dynamic-loading` panics when `libcuda` or one of its symbols is missing, so every
//! entry point here goes through [`driver`] first, which checks `is_culib_present()` and runs
//! `cuInit` inside `catch_unwind`; a machine without CUDA gets an `Unsupported` error, never a
//! panic. We work in the device's *primary* context, the one PyTorch's runtime uses, so device
//! pointers and stream handles from torch are valid here.
//!
//! Layers, as in cudarc: [`result`] turns each driver call's code into a `Result`; the safe
//! types here own driver objects (`Stream`, `Event`, `PinnedBuf`) or describe memory we may
//! write (`DeviceSpan`); `pool` is the bounded pool of pinned staging buffers, whose buffers
//! queue their own copies; `Engine` bundles what one device needs and is shared by every load
//! on that device. Callers (the load pipeline) write no `unsafe` to use them: the one promise
//! they cannot check, that a raw device pointer is live memory, is made once where the pointer
//! enters ([`DeviceSpan::new`], [`StreamHandle::foreign`]).
pub mod counters;
pub mod nvrtc;
pub mod pool;
pub mod result;
pub mod secretbox;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;

use crate::error::{Error, ErrorKind, Result};

pub use pool::{Pool, Staged};

fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

/// Load libcuda and initialise the driver, once per process. Every entry point calls this
/// before touching any other driver function.
pub fn driver() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            // SAFETY: looks the library up; cudarc panics (caught) where it is missing.
            let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
            if !present {
                return Err("the CUDA driver library (libcuda.so) was not found on this machine".into());
            }
            match std::panic::catch_unwind(result::init) {
                Ok(r) => r.map_err(|e| e.message),
                Err(_) => Err("the CUDA driver library is missing a required function".into()),
            }
        })
        .clone()
        .map_err(|m| unsupported(format!("CUDA is not available: {m}")))
}

/// Number of CUDA devices, or an `Unsupported` error without a usable driver.
pub fn device_count() -> Result<usize> {
    driver()?;
    Ok(result::device_count()?.max(0) as usize)
}

/// The PCI bus id of device `ordinal` (`"0000:1B:00.0"`). A driver without the call (cudarc
/// panics on a missing symbol) is an `Unsupported` error.
pub fn pci_bus_id(ordinal: i32) -> Result<String> {
    driver()?;
    let dev = result::device(ordinal)?;
    std::panic::catch_unwind(|| result::device_pci_bus_id(dev))
        .unwrap_or_else(|_| Err(unsupported("the CUDA driver has no cuDeviceGetPCIBusId")))
}

/// A device's primary context (retained once and kept for the life of the process, as
/// PyTorch does).
#[derive(Clone, Copy)]
pub struct Context {
    raw: sys::CUcontext,
    pub ordinal: i32,
}

// The context handle is process-wide; the driver allows using it from any thread.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Context {
    pub fn primary(ordinal: i32) -> Result<Self> {
        static CTXS: OnceLock<Mutex<HashMap<i32, usize>>> = OnceLock::new();
        let count = device_count()?;
        if ordinal < 0 || ordinal as usize >= count {
            return Err(Error::value(format!("CUDA device {ordinal} does not exist ({count} devices)")));
        }
        let mut map = CTXS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&raw) = map.get(&ordinal) {
            return Ok(Context { raw: raw as sys::CUcontext, ordinal });
        }
        let raw = result::primary_context(result::device(ordinal)?)?;
        map.insert(ordinal, raw as usize);
        Ok(Context { raw, ordinal })
    }

    /// Make this context current on the calling thread (each worker thread must).
    pub fn bind(&self) -> Result<()> {
        // SAFETY: a retained primary context, never released.
        unsafe { result::set_current(self.raw) }
    }

    /// Make this context current until the guard drops, then restore the previous one: the
    /// caller's thread is PyTorch's, whose notion of the current device must not change.
    pub fn bind_scoped(&self) -> Result<CtxGuard> {
        let prev = result::current()?;
        self.bind()?;
        Ok(CtxGuard { prev })
    }
}

pub struct CtxGuard {
    prev: sys::CUcontext,
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        // SAFETY: restoring what was current (possibly null, which unbinds).
        let _ = unsafe { result::set_current(self.prev) };
    }
}

/// A non-blocking stream: it never synchronises implicitly with the legacy default stream;
/// ordering with PyTorch's stream is made explicit with events.
pub struct Stream(sys::CUstream);
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

/// A stream handle to queue work on: one of ours, or PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHandle(sys::CUstream);
unsafe impl Send for StreamHandle {}
unsafe impl Sync for StreamHandle {}

impl StreamHandle {
    /// A stream someone else owns (PyTorch's current stream; 0 is the legacy default stream).
    ///
    /// # Safety
    /// `handle` must be a live stream of the context work will be queued in, or 0, for as long
    /// as the handle is used.
    pub unsafe fn foreign(handle: u64) -> Self {
        StreamHandle(handle as usize as sys::CUstream)
    }

    /// Wait until everything queued on the stream has run.
    pub fn synchronize(self) -> Result<()> {
        // SAFETY: handles are only made from live streams.
        unsafe { result::stream_synchronize(self.0) }
    }
}

impl Stream {
    pub fn new() -> Result<Self> {
        Ok(Stream(result::stream_create()?))
    }
    pub fn handle(&self) -> StreamHandle {
        StreamHandle(self.0)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: we own the stream; destroying it lets queued work finish first.
        unsafe { result::stream_destroy(self.0) };
    }
}

/// An event without timing (the cheap kind), used to order streams and to know when a
/// staging buffer's copy has finished.
pub struct Event(sys::CUevent);
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub fn new() -> Result<Self> {
        Ok(Event(result::event_create()?))
    }
    pub fn record(&self, stream: StreamHandle) -> Result<()> {
        // SAFETY: our event; handles are only made from live streams.
        unsafe { result::event_record(self.0, stream.0) }
    }
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: our event.
        unsafe { result::event_synchronize(self.0) }
    }
    /// Make `stream` wait (on the device) for the work this event captured.
    pub fn wait_on(&self, stream: StreamHandle) -> Result<()> {
        // SAFETY: our event; handles are only made from live streams.
        unsafe { result::stream_wait_event(stream.0, self.0) }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: we own the event.
        unsafe { result::event_destroy(self.0) };
    }
}

/// Device memory a load may write: `len` bytes at `ptr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpan {
    ptr: u64,
    len: u64,
}

impl DeviceSpan {
    /// # Safety
    /// `ptr..ptr + len` is device memory of the context work will be queued in, free to
    /// overwrite, and stays allocated until the streams that write it have been synchronised
    /// (a load does that before it returns).
    pub unsafe fn new(ptr: u64, len: u64) -> Self {
        DeviceSpan { ptr, len }
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn is_null(&self) -> bool {
        self.ptr == 0
    }
    /// The device address of its first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    /// `len` bytes at `offset`, or an error if they run past the span.
    pub fn sub(&self, offset: u64, len: u64) -> Result<DeviceSpan> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(DeviceSpan { ptr: self.ptr + offset, len }),
            _ => Err(Error::io(format!("internal error: {len} bytes at {offset} of a {}-byte destination", self.len))),
        }
    }

    /// Queue a copy of `src`, ordinary (pageable) host memory: the driver stages it before it
    /// returns, so `src` may change afterwards. Slow (no DMA from it); for rare cases.
    pub fn copy_from_pageable(&self, src: &[u8], stream: StreamHandle) -> Result<()> {
        let dst = self.sub(0, src.len() as u64)?;
        // SAFETY: `dst` lies in the span (checked); pageable memory is staged by the driver.
        unsafe { result::copy_htod(dst.ptr, src, stream.0) }
    }

    /// Queue a zero fill of the whole span.
    pub fn zero(&self, stream: StreamHandle) -> Result<()> {
        // SAFETY: the span's memory (see `new`).
        unsafe { result::memset_zero(self.ptr, self.len as usize, stream.0) }
    }
}

/// How staging memory is page-locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinnedMode {
    /// `cuMemHostAlloc`: the driver allocates and pins 4 KiB pages.
    Driver,
    /// Anonymous memory backed by transparent huge pages, then `cuMemHostRegister`ed: pinning
    /// 2 MiB pages is far cheaper than 4 KiB ones, which shortens a process's first load.
    HugePages,
}

/// Huge pages: a process's first 16 GiB load ran at 46 GB/s instead of 42 (H200, see
/// docs/benchmarks.md), pinning being most of a first load's extra cost.
pub const DEFAULT_PINNED: PinnedMode = PinnedMode::HugePages;
const HUGE: usize = 2 << 20;

/// Page-locked host memory. Plain cached memory (not write-combined, cudarc's default),
/// because the CPU reads it back when it decrypts or hashes in place.
pub struct PinnedBuf {
    ptr: *mut u8,
    cap: usize,
    /// For `HugePages`: the whole mapping (`ptr` is its 2 MiB-aligned start).
    map: Option<(*mut u8, usize)>,
}
unsafe impl Send for PinnedBuf {}
unsafe impl Sync for PinnedBuf {}

impl PinnedBuf {
    pub fn new(cap: usize, mode: PinnedMode) -> Result<Self> {
        match mode {
            PinnedMode::Driver => Self::driver(cap),
            // Any failure (no THP, registration refused): fall back to the driver's allocator.
            PinnedMode::HugePages => Self::huge(cap).or_else(|_| Self::driver(cap)),
        }
    }

    fn driver(cap: usize) -> Result<Self> {
        Ok(PinnedBuf { ptr: result::host_alloc(cap)?, cap, map: None })
    }

    fn huge(cap: usize) -> Result<Self> {
        let cap = cap.next_multiple_of(HUGE);
        let map_len = cap + HUGE;
        // SAFETY: a fresh private anonymous mapping, unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::io("mmap of staging memory failed"));
        }
        let base = base as *mut u8;
        let ptr = base.wrapping_add(base.align_offset(HUGE));
        // SAFETY: `ptr..ptr + cap` lies inside the mapping; touching each 4 KiB page faults in
        // huge pages (where THP allows) before the driver pins them; the mapping stays until
        // Drop, which unregisters first.
        let registered = unsafe {
            libc::madvise(ptr as *mut c_void, cap, libc::MADV_HUGEPAGE);
            for off in (0..cap).step_by(4096) {
                std::ptr::write_volatile(ptr.add(off), 0);
            }
            result::host_register(ptr, cap)
        };
        if let Err(e) = registered {
            // SAFETY: our mapping, never registered.
            unsafe { libc::munmap(base as *mut c_void, map_len) };
            return Err(e);
        }
        Ok(PinnedBuf { ptr, cap, map: Some((base, map_len)) })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated/registered in `new`; the pool binds a context and waits for the
        // copies from the buffer before dropping it.
        unsafe {
            match self.map {
                None => result::host_free(self.ptr),
                Some((base, len)) => {
                    result::host_unregister(self.ptr);
                    libc::munmap(base as *mut c_void, len);
                }
            }
        }
    }
}

/// Pool sizes. `chunk` is the size of one staging buffer (and of one read); `total` bounds
/// the pinned memory the pool may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    pub total: usize,
    pub chunk: usize,
    pub streams: usize,
    pub pinned: PinnedMode,
}

/// 32 buffers of 8 MiB: enough reads in flight to keep PCIe busy, small for any host. Larger
/// or smaller buffers and one copy stream instead of four did not load faster
/// (docs/benchmarks.md).
pub const DEFAULT_STAGING: StagingConfig =
    StagingConfig { total: 256 << 20, chunk: 8 << 20, streams: 4, pinned: DEFAULT_PINNED };

fn config_cell() -> &'static Mutex<StagingConfig> {
    static CONFIG: Mutex<StagingConfig> = Mutex::new(DEFAULT_STAGING);
    &CONFIG
}

fn normalize(mut c: StagingConfig) -> StagingConfig {
    // Whole huge pages, so that the THP-backed pool wastes nothing.
    c.chunk = c.chunk.clamp(2 << 20, 1 << 30).next_multiple_of(2 << 20);
    c.total = c.total.max(c.chunk);
    c.streams = c.streams.clamp(1, 32);
    c
}

pub fn staging_config() -> StagingConfig {
    *config_cell().lock().unwrap_or_else(|p| p.into_inner())
}

/// Change the pool sizes; engines pick them up at their next load (buffers in use by a
/// running load are returned to the old pool and freed with it).
pub fn set_staging_config(c: StagingConfig) -> StagingConfig {
    let c = normalize(c);
    *config_cell().lock().unwrap_or_else(|p| p.into_inner()) = c;
    c
}

/// Per-device state shared by all loads: the context, copy streams and the staging pool.
pub struct Engine {
    pub ctx: Context,
    streams: Vec<Stream>,
    pool: Mutex<Arc<Pool>>,
}

impl Engine {
    /// The engine of device `ordinal`, created on first use.
    pub fn get(ordinal: i32) -> Result<Arc<Engine>> {
        static ENGINES: OnceLock<Mutex<HashMap<i32, Arc<Engine>>>> = OnceLock::new();
        let ctx = Context::primary(ordinal)?;
        let mut map = ENGINES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(&ordinal) {
            return Ok(e.clone());
        }
        let _bound = ctx.bind_scoped()?;
        let cfg = staging_config();
        let streams = (0..cfg.streams).map(|_| Stream::new()).collect::<Result<Vec<_>>>()?;
        let engine = Arc::new(Engine { ctx, streams, pool: Mutex::new(Arc::new(Pool::new(ctx, cfg))) });
        map.insert(ordinal, engine.clone());
        Ok(engine)
    }

    /// The copy streams; reader `w` queues its copies on `streams()[w % len]`.
    pub fn streams(&self) -> impl ExactSizeIterator<Item = StreamHandle> + '_ {
        self.streams.iter().map(Stream::handle)
    }

    /// The pool to use now: replaced when the configuration changed since it was made.
    pub fn pool(&self) -> Arc<Pool> {
        let cfg = staging_config();
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.config() != cfg {
            *p = Arc::new(Pool::new(self.ctx, cfg));
        }
        p.clone()
    }

    /// Free the pinned buffers not in use (they are made again on demand).
    pub fn release_staging(&self) {
        let cfg = staging_config();
        *self.pool.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(Pool::new(self.ctx, cfg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_every_entry_is_an_unsupported_error() {
        // On machines with CUDA this checks nothing; without, it must fail cleanly (no panic).
        // SAFETY: looks the library up; cudarc panics (caught) where it is missing.
        if std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false) {
            return;
        }
        for e in [device_count().unwrap_err(), Engine::get(0).err().expect("no engine without CUDA")] {
            assert_eq!(e.kind, ErrorKind::Unsupported, "{e}");
            assert!(e.message.contains("CUDA is not available"), "{e}");
        }
    }

    #[test]
    fn staging_sizes_are_whole_huge_pages() {
        let c = normalize(StagingConfig { total: 1, chunk: 3 << 20, streams: 0, pinned: PinnedMode::Driver });
        assert_eq!((c.chunk, c.total, c.streams), (4 << 20, 4 << 20, 1));
        let c = normalize(StagingConfig { total: 256 << 20, chunk: 1, streams: 99, pinned: PinnedMode::HugePages });
        assert_eq!((c.chunk, c.total, c.streams, c.pinned), (2 << 20, 256 << 20, 32, PinnedMode::HugePages));
    }

    #[test]
    fn device_spans_refuse_ranges_past_their_end() {
        // SAFETY: never used for a copy.
        let span = unsafe { DeviceSpan::new(1 << 20, 100) };
        assert_eq!(span.sub(40, 60).unwrap(), unsafe { DeviceSpan::new((1 << 20) + 40, 60) });
        assert!(span.sub(41, 60).is_err() && span.sub(u64::MAX, 2).is_err());
    }
}
