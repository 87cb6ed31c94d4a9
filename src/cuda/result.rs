//! The driver calls this crate makes, each turning its result code into a `Result` whose error
//! names the call: cudarc's own `result` layer where it has the call, its raw `sys` binding
//! where it does not (page-locking host memory we allocated, batched copies). The safe types
//! in `cuda/mod.rs` and `pool.rs` are built on these; nothing outside `cuda/` calls the driver.
//!
//! Every function here may only be called after [`super::driver`] succeeded: cudarc's dynamic
//! loading panics on a missing library or symbol, which `driver()` rules out first.
use std::ffi::c_void;

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys;

use crate::error::{Error, Result};

/// A driver result code as an error naming the call.
pub fn error(code: sys::CUresult, what: &str) -> Error {
    let text = DriverError(code).error_string().map(|s| s.to_string_lossy().into_owned());
    let text = text.unwrap_or_else(|_| format!("{code:?}"));
    Error::io(format!("CUDA error in {what}: {text} ({code:?})"))
}

fn named(what: &'static str) -> impl FnOnce(DriverError) -> Error {
    move |e| error(e.0, what)
}

fn check(r: sys::CUresult, what: &'static str) -> Result<()> {
    r.result().map_err(named(what))
}

pub fn init() -> Result<()> {
    cu::init().map_err(named("cuInit"))
}

pub fn device_count() -> Result<i32> {
    cu::device::get_count().map_err(named("cuDeviceGetCount"))
}

pub fn device(ordinal: i32) -> Result<sys::CUdevice> {
    cu::device::get(ordinal).map_err(named("cuDeviceGet"))
}

/// The device's PCI bus id (`"0000:1B:00.0"`), to find it in sysfs.
pub fn device_pci_bus_id(dev: sys::CUdevice) -> Result<String> {
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: a device handle from `device`; the driver writes at most `len` bytes,
    // NUL-terminated.
    check(unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev) }, "cuDeviceGetPCIBusId")?;
    // SAFETY: NUL-terminated within the buffer (written by the driver, or our zeroes).
    buf[buf.len() - 1] = 0;
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// The device's primary context, retained (never released: it lives as long as the process,
/// as PyTorch's does).
pub fn primary_context(dev: sys::CUdevice) -> Result<sys::CUcontext> {
    // SAFETY: a device handle from `device`.
    unsafe { cu::primary_ctx::retain(dev) }.map_err(named("cuDevicePrimaryCtxRetain"))
}

/// # Safety
/// `ctx` is a live context (or null, which unbinds).
pub unsafe fn set_current(ctx: sys::CUcontext) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::ctx::set_current(ctx) }.map_err(named("cuCtxSetCurrent"))
}

pub fn current() -> Result<sys::CUcontext> {
    Ok(cu::ctx::get_current().map_err(named("cuCtxGetCurrent"))?.unwrap_or(std::ptr::null_mut()))
}

/// A stream that never synchronises implicitly with the legacy default stream.
pub fn stream_create() -> Result<sys::CUstream> {
    cu::stream::create(cu::stream::StreamKind::NonBlocking).map_err(named("cuStreamCreate"))
}

/// # Safety
/// `stream` is live (ours or PyTorch's), or null (the legacy default stream).
pub unsafe fn stream_synchronize(stream: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::stream::synchronize(stream) }.map_err(named("cuStreamSynchronize"))
}

/// # Safety
/// We own `stream` and use it no more; queued work finishes first.
pub unsafe fn stream_destroy(stream: sys::CUstream) {
    // SAFETY: the caller's contract.
    let _ = unsafe { cu::stream::destroy(stream) };
}

/// # Safety
/// `stream` and `event` are live.
pub unsafe fn stream_wait_event(stream: sys::CUstream, event: sys::CUevent) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::stream::wait_event(stream, event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
        .map_err(named("cuStreamWaitEvent"))
}

/// An event without timing (the cheap kind).
pub fn event_create() -> Result<sys::CUevent> {
    cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(named("cuEventCreate"))
}

/// # Safety
/// `event` and `stream` are live.
pub unsafe fn event_record(event: sys::CUevent, stream: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::event::record(event, stream) }.map_err(named("cuEventRecord"))
}

/// # Safety
/// `event` is live.
pub unsafe fn event_synchronize(event: sys::CUevent) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::event::synchronize(event) }.map_err(named("cuEventSynchronize"))
}

/// # Safety
/// We own `event` and use it no more.
pub unsafe fn event_destroy(event: sys::CUevent) {
    // SAFETY: the caller's contract.
    let _ = unsafe { cu::event::destroy(event) };
}

/// Page-locked host memory from the driver (4 KiB pages, usable from every context).
pub fn host_alloc(len: usize) -> Result<*mut u8> {
    // SAFETY: an allocation call; a context is current (the caller binds one).
    let p = unsafe { cu::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(named("cuMemHostAlloc"))?;
    Ok(p as *mut u8)
}

/// # Safety
/// `ptr` came from [`host_alloc`] and nothing uses it any more (no queued copy reads it).
pub unsafe fn host_free(ptr: *mut u8) {
    // SAFETY: the caller's contract.
    let _ = unsafe { cu::free_host(ptr as *mut c_void) };
}

/// Page-lock host memory we allocated, for copies from every context.
///
/// # Safety
/// `ptr..ptr + len` is mapped, ours, and stays mapped until [`host_unregister`].
pub unsafe fn host_register(ptr: *mut u8, len: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    check(
        unsafe { sys::cuMemHostRegister_v2(ptr as *mut c_void, len, sys::CU_MEMHOSTREGISTER_PORTABLE) },
        "cuMemHostRegister",
    )
}

/// # Safety
/// `ptr` was registered with [`host_register`] and no queued copy reads it.
pub unsafe fn host_unregister(ptr: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { sys::cuMemHostUnregister(ptr as *mut c_void) };
}

/// Queue a host→device copy of `src` to `dst`.
///
/// # Safety
/// `dst` is device memory of at least `src.len()` bytes; `src` stays valid and unchanged until
/// the stream reaches the copy (page-locked memory), or is pageable (then the driver stages it
/// before returning).
pub unsafe fn copy_htod(dst: u64, src: &[u8], stream: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::memcpy_htod_async(dst, src, stream) }.map_err(named("cuMemcpyHtoDAsync"))
}

/// Queue host→device copies `dsts[i] <- srcs[i]` (`sizes[i]` bytes) as one call.
///
/// # Safety
/// As for [`copy_htod`], for every element; the slices have equal lengths; the driver has the
/// call ([`has_batch`]).
pub unsafe fn copy_htod_batch(
    dsts: &mut [u64],
    srcs: &mut [u64],
    sizes: &mut [usize],
    device: i32,
    stream: sys::CUstream,
) -> Result<()> {
    let mut attrs = sys::CUmemcpyAttributes {
        srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
        srcLocHint: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST, id: 0 },
        dstLocHint: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: device },
        flags: 0,
    };
    let (mut idx, mut fail) = (0usize, 0usize);
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
            stream,
        )
    };
    check(r, "cuMemcpyBatchAsync")
}

/// Whether the loaded driver has `cuMemcpyBatchAsync` (CUDA 12.8+).
pub fn has_batch() -> bool {
    // SAFETY: looking a symbol up does not call it; `driver()` succeeded before any copy.
    unsafe { sys::culib().get::<unsafe extern "C" fn()>(b"cuMemcpyBatchAsync").is_ok() }
}

/// Queue a zero fill of `len` device bytes at `dst`.
///
/// # Safety
/// `dst` is device memory of at least `len` bytes.
pub unsafe fn memset_zero(dst: u64, len: usize, stream: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::memset_d8_async(dst, 0, len, stream) }.map_err(named("cuMemsetD8Async"))
}

/// `len` bytes of device memory in the current context, uninitialised.
pub fn mem_alloc(len: usize) -> Result<sys::CUdeviceptr> {
    // SAFETY: an allocation call; the memory is handed out as a raw address, read by no one
    // before it is written.
    unsafe { cu::malloc_sync(len) }.map_err(named("cuMemAlloc"))
}

/// # Safety
/// `ptr` came from [`mem_alloc`] and nothing uses it any more (cuMemFree waits for queued work).
pub unsafe fn mem_free(ptr: sys::CUdeviceptr) {
    // SAFETY: the caller's contract.
    let _ = unsafe { cu::free_sync(ptr) };
}

/// Zero `len` device bytes at `dst` and wait for it.
///
/// # Safety
/// `dst` is device memory of at least `len` bytes.
pub unsafe fn memset_zero_sync(dst: sys::CUdeviceptr, len: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::memset_d8_sync(dst, 0, len) }.map_err(named("cuMemsetD8"))
}

/// Copy `size_of_val(dst)` bytes of device memory at `src` into `dst`, waiting for it.
///
/// # Safety
/// `src` is device memory of at least that many bytes, no longer written by queued work, and
/// any bit pattern is a valid `T`.
pub unsafe fn copy_dtoh<T>(dst: &mut [T], src: sys::CUdeviceptr) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(named("cuMemcpyDtoH"))
}

/// One of the device's attributes (compute capability, ...).
pub fn device_attribute(dev: sys::CUdevice, attr: sys::CUdevice_attribute) -> Result<i32> {
    // SAFETY: a device handle from `device`.
    unsafe { cu::device::get_attribute(dev, attr) }.map_err(named("cuDeviceGetAttribute"))
}

/// Load a module into the current context (for the life of the process: never unloaded).
///
/// # Safety
/// `image` is a cubin, or PTX ending in a NUL byte.
pub unsafe fn module_load_data(image: &[u8]) -> Result<sys::CUmodule> {
    // SAFETY: the caller's contract.
    unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }.map_err(named("cuModuleLoadData"))
}

/// # Safety
/// `module` is loaded (and stays loaded while the function is used).
pub unsafe fn module_function(module: sys::CUmodule, name: &std::ffi::CStr) -> Result<sys::CUfunction> {
    // SAFETY: the caller's contract.
    unsafe { cu::module::get_function(module, name.to_owned()) }.map_err(named("cuModuleGetFunction"))
}

/// Queue `f` on `stream` over a one-dimensional grid of `grid` blocks of `threads` threads.
///
/// # Safety
/// `f` is a loaded function whose parameters are exactly `params` (pointers to the argument
/// values, which the driver copies before returning); every memory the arguments name is valid
/// for what the kernel does with it until the stream has run it; `stream` is live.
pub unsafe fn launch_kernel(
    f: sys::CUfunction,
    grid: u32,
    threads: u32,
    stream: sys::CUstream,
    params: &mut [*mut c_void],
    what: &'static str,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { cu::launch_kernel(f, (grid, 1, 1), (threads, 1, 1), 0, stream, params) }.map_err(named(what))
}
