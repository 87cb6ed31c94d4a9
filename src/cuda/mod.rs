//! The CUDA driver, reached through cudarc's raw bindings (`cudarc::driver::sys`), loaded at run
//! time so that the package imports and works on machines without CUDA.
//!
//! cudarc's `dynamic-loading` panics when `libcuda` or one of its symbols is missing, so every
//! entry point here goes through [`driver`] first, which checks `is_culib_present()` and runs
//! `cuInit` inside `catch_unwind`; a machine without CUDA gets an `Unsupported` error, never a
//! panic. We work in the device's *primary* context, the one PyTorch's runtime uses, so device
//! pointers and stream handles from torch are valid here.
//!
//! Layers, as in cudarc: `check` turns result codes into errors; the small RAII types below
//! (`Stream`, `Event`, `PinnedBuf`, `Registration`) own driver objects; `pool` is the bounded
//! pool of pinned staging buffers; `Engine` bundles what one device needs and is shared by
//! every load on that device.
pub mod counters;
pub mod nvrtc;
pub mod pool;
pub mod secretbox;

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys;

use crate::error::{Error, ErrorKind, Result};

pub use pool::{Pool, Staged};

fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

/// A driver result code as an error naming the call.
pub fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a pointer to a static string (or leaves it null).
    let text = unsafe {
        if sys::cuGetErrorString(r, &mut s) == sys::CUresult::CUDA_SUCCESS && !s.is_null() {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        } else {
            format!("{r:?}")
        }
    };
    Err(Error::io(format!("CUDA error in {what}: {text} ({r:?})")))
}

/// Load libcuda and initialise the driver, once per process. Every entry point calls this
/// before touching any other driver function.
pub fn driver() -> Result<()> {
    static STATE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
            if !present {
                return Err("the CUDA driver library (libcuda.so) was not found on this machine".into());
            }
            match std::panic::catch_unwind(|| unsafe { sys::cuInit(0) }) {
                Ok(sys::CUresult::CUDA_SUCCESS) => Ok(()),
                Ok(r) => Err(check(r, "cuInit").map_err(|e| e.message).err().unwrap_or_default()),
                Err(_) => Err("the CUDA driver library is missing a required function".into()),
            }
        })
        .clone()
        .map_err(|m| unsupported(format!("CUDA is not available: {m}")))
}

/// Number of CUDA devices, or an `Unsupported` error without a usable driver.
pub fn device_count() -> Result<usize> {
    driver()?;
    let mut n = 0;
    // SAFETY: plain out-parameter call after a successful cuInit.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n.max(0) as usize)
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
        let mut dev = 0;
        let mut raw = std::ptr::null_mut();
        // SAFETY: out-parameter calls; the retained context is never released.
        unsafe {
            check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            check(sys::cuDevicePrimaryCtxRetain(&mut raw, dev), "cuDevicePrimaryCtxRetain")?;
        }
        map.insert(ordinal, raw as usize);
        Ok(Context { raw, ordinal })
    }

    /// Make this context current on the calling thread (each worker thread must).
    pub fn bind(&self) -> Result<()> {
        // SAFETY: a valid, retained context.
        check(unsafe { sys::cuCtxSetCurrent(self.raw) }, "cuCtxSetCurrent")
    }

    /// Make this context current until the guard drops, then restore the previous one: the
    /// caller's thread is PyTorch's, whose notion of the current device must not change.
    pub fn bind_scoped(&self) -> Result<CtxGuard> {
        let mut prev = std::ptr::null_mut();
        // SAFETY: out-parameter call.
        check(unsafe { sys::cuCtxGetCurrent(&mut prev) }, "cuCtxGetCurrent")?;
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
        unsafe { sys::cuCtxSetCurrent(self.prev) };
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

impl Stream {
    pub fn new() -> Result<Self> {
        let mut s = std::ptr::null_mut();
        // SAFETY: out-parameter call; a context is current.
        check(
            unsafe { sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) },
            "cuStreamCreate",
        )?;
        Ok(Stream(s))
    }
    pub fn handle(&self) -> StreamHandle {
        StreamHandle(self.0)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: we own the stream; destroying it lets queued work finish first.
        unsafe { sys::cuStreamDestroy_v2(self.0) };
    }
}

/// Wrap a stream handle that someone else owns (PyTorch's current stream; 0 is the legacy
/// default stream).
///
/// # Safety
/// `handle` must be a live stream of the context work will be queued in, or 0.
pub unsafe fn foreign_stream(handle: u64) -> StreamHandle {
    StreamHandle(handle as usize as sys::CUstream)
}

pub fn synchronize(stream: StreamHandle) -> Result<()> {
    // SAFETY: handles are only made from live streams.
    check(unsafe { sys::cuStreamSynchronize(stream.0) }, "cuStreamSynchronize")
}

/// An event without timing (the cheap kind), used to order streams and to know when a
/// staging buffer's copy has finished.
pub struct Event(sys::CUevent);
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub fn new() -> Result<Self> {
        let mut e = std::ptr::null_mut();
        // SAFETY: out-parameter call; a context is current.
        check(
            unsafe { sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) },
            "cuEventCreate",
        )?;
        Ok(Event(e))
    }
    pub fn record(&self, stream: StreamHandle) -> Result<()> {
        // SAFETY: valid event and stream.
        check(unsafe { sys::cuEventRecord(self.0, stream.0) }, "cuEventRecord")
    }
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: valid event.
        check(unsafe { sys::cuEventSynchronize(self.0) }, "cuEventSynchronize")
    }
    /// Make `stream` wait (on the device) for the work this event captured.
    pub fn wait_on(&self, stream: StreamHandle) -> Result<()> {
        // SAFETY: valid event and stream.
        check(unsafe { sys::cuStreamWaitEvent(stream.0, self.0, 0) }, "cuStreamWaitEvent")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: we own the event.
        unsafe { sys::cuEventDestroy_v2(self.0) };
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

impl PinnedMode {
    /// From `TENSORIZER_RS_PINNED` (`driver` or `thp`), else the default.
    pub fn from_env() -> Self {
        match std::env::var("TENSORIZER_RS_PINNED").as_deref() {
            Ok("driver") => PinnedMode::Driver,
            Ok("thp") => PinnedMode::HugePages,
            _ => DEFAULT_PINNED,
        }
    }
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
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-parameter call; a context is current.
        check(unsafe { sys::cuMemHostAlloc(&mut p, cap, sys::CU_MEMHOSTALLOC_PORTABLE) }, "cuMemHostAlloc")?;
        Ok(PinnedBuf { ptr: p as *mut u8, cap, map: None })
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
        // huge pages (where THP allows) before the driver pins them.
        let r = unsafe {
            libc::madvise(ptr as *mut c_void, cap, libc::MADV_HUGEPAGE);
            for off in (0..cap).step_by(4096) {
                std::ptr::write_volatile(ptr.add(off), 0);
            }
            sys::cuMemHostRegister_v2(ptr as *mut c_void, cap, sys::CU_MEMHOSTREGISTER_PORTABLE)
        };
        if let Err(e) = check(r, "cuMemHostRegister") {
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
        // SAFETY: allocated/registered in `new`; the pool binds a context before dropping.
        unsafe {
            match self.map {
                None => {
                    sys::cuMemFreeHost(self.ptr as *mut c_void);
                }
                Some((base, len)) => {
                    sys::cuMemHostUnregister(self.ptr as *mut c_void);
                    libc::munmap(base as *mut c_void, len);
                }
            }
        }
    }
}

/// A host range page-locked in place with `cuMemHostRegister` (read-only), so the GPU can copy
/// straight out of it: used for page-cache pages of a memory-mapped file.
pub struct Registration {
    ptr: *mut u8,
}
unsafe impl Send for Registration {}

impl Registration {
    /// `ptr` and `len` must be page-aligned and the range must stay mapped while registered.
    pub fn new(ptr: *mut u8, len: usize) -> Result<Self> {
        let flags = sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller keeps the mapping alive for the registration's life.
        check(unsafe { sys::cuMemHostRegister_v2(ptr as *mut c_void, len, flags) }, "cuMemHostRegister")?;
        Ok(Registration { ptr })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: registered in `new`; callers drop only after copies from it have finished.
        unsafe { sys::cuMemHostUnregister(self.ptr as *mut c_void) };
    }
}

/// Queue a host→device copy. `src` must stay valid and unchanged until the stream reaches it
/// (pinned or registered memory), or be pageable (then the driver stages it before returning).
///
/// # Safety
/// `dst` must be device memory of at least `len` bytes, `src` readable for `len` bytes.
pub unsafe fn copy_htod(dst: u64, src: *const u8, len: usize, stream: StreamHandle) -> Result<()> {
    check(unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, stream.0) }, "cuMemcpyHtoDAsync")
}

/// Whether `cuMemcpyBatchAsync` (drivers for CUDA 12.8+) may be used: present in the loaded
/// driver, not turned off with `TENSORIZER_RS_BATCH=0`, and not failed before.
fn batch_usable() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        std::env::var("TENSORIZER_RS_BATCH").as_deref() != Ok("0")
            // SAFETY: looking a symbol up does not call it; `driver()` succeeded before any copy.
            && unsafe { sys::culib().get::<unsafe extern "C" fn()>(b"cuMemcpyBatchAsync").is_ok() }
    });
    present && !BATCH_FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

static BATCH_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Queue host→device copies `dsts[i] <- srcs[i]` (`sizes[i]` bytes) on `stream`: one
/// `cuMemcpyBatchAsync` where the driver has it (a copy launch costs microseconds, which adds
/// up over thousands of small tensors), else one call each. Returns whether it batched.
///
/// # Safety
/// As for [`copy_htod`], for every element; the slices have equal lengths.
pub unsafe fn copy_htod_many(
    dsts: &mut [u64],
    srcs: &mut [u64],
    sizes: &mut [usize],
    device: i32,
    stream: StreamHandle,
) -> Result<bool> {
    if dsts.len() > 1 && batch_usable() {
        let mut attrs = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, id: 0 },
            dstLocHint: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: device },
            flags: 0,
        };
        let mut idx = 0usize;
        let mut fail = 0usize;
        // SAFETY: equal-length arrays; one attribute entry applying from copy 0 on.
        let r = unsafe {
            sys::cuMemcpyBatchAsync(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                dsts.len(),
                &mut attrs,
                &mut idx,
                1,
                &mut fail,
                stream.0,
            )
        };
        if r == sys::CUresult::CUDA_SUCCESS {
            return Ok(true);
        }
        // Unsupported here: never try again; redo these one by one (copies are idempotent).
        BATCH_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    for ((&d, &s), &n) in dsts.iter().zip(srcs.iter()).zip(sizes.iter()) {
        // SAFETY: the caller's contract.
        unsafe { copy_htod(d, s as *const u8, n, stream)? };
    }
    Ok(false)
}

/// Queue a zero fill of `len` device bytes.
///
/// # Safety
/// `dst` must be device memory of at least `len` bytes.
pub unsafe fn zero_device(dst: u64, len: usize, stream: StreamHandle) -> Result<()> {
    check(unsafe { sys::cuMemsetD8Async(dst, 0, len, stream.0) }, "cuMemsetD8Async")
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

/// 32 buffers of 8 MiB: enough reads in flight to keep PCIe busy, small for any host.
pub const DEFAULT_STAGING: StagingConfig =
    StagingConfig { total: 256 << 20, chunk: 8 << 20, streams: 4, pinned: DEFAULT_PINNED };

fn config_cell() -> &'static Mutex<StagingConfig> {
    static CONFIG: OnceLock<Mutex<StagingConfig>> = OnceLock::new();
    CONFIG.get_or_init(|| Mutex::new(env_config()))
}

/// The defaults, overridden by `TENSORIZER_RS_STAGING_BYTES` / `_CHUNK` / `_STREAMS`.
fn env_config() -> StagingConfig {
    let get = |k: &str| std::env::var(k).ok().and_then(|v| v.trim().parse::<usize>().ok());
    let mut c = DEFAULT_STAGING;
    c.pinned = PinnedMode::from_env();
    if let Some(v) = get("TENSORIZER_RS_STAGING_BYTES") {
        c.total = v;
    }
    if let Some(v) = get("TENSORIZER_RS_STAGING_CHUNK") {
        c.chunk = v;
    }
    if let Some(v) = get("TENSORIZER_RS_STAGING_STREAMS") {
        c.streams = v;
    }
    normalize(c)
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
    pub streams: Vec<Stream>,
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
}
