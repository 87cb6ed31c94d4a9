//! Process-wide counters of the GPU path, so tests (and users) can tell which way bytes went:
//! a host load followed by `.to("cuda")` never moves them.
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[derive(Debug, Default, Clone, Copy)]
        pub struct Snapshot { $(#[doc = $doc] pub $name: u64,)* }
        struct All { $($name: AtomicU64,)* }
        static ALL: All = All { $($name: AtomicU64::new(0),)* };
        /// Read every counter.
        pub fn snapshot() -> Snapshot { Snapshot { $($name: ALL.$name.load(Ordering::Relaxed),)* } }
        /// Zero every counter except the staging gauges (`staging_allocated`, `staging_in_use`),
        /// which track live memory.
        pub fn reset() {
            $(if !matches!(stringify!($name), "staging_allocated" | "staging_in_use") {
                ALL.$name.store(0, Ordering::Relaxed);
            })*
            let now = ALL.staging_in_use.load(Ordering::Relaxed);
            ALL.peak_staging_in_use.store(now, Ordering::Relaxed);
            let alloc = ALL.staging_allocated.load(Ordering::Relaxed);
            ALL.peak_staging_allocated.store(alloc, Ordering::Relaxed);
        }
        pub fn as_pairs(s: &Snapshot) -> Vec<(&'static str, u64)> { vec![$((stringify!($name), s.$name),)*] }
    };
}

counters! {
    loads: "Completed loads to a device.",
    bytes_to_device: "Tensor bytes written to device memory by loads (copies and zero fills).",
    staged_bytes: "Bytes copied host→device out of the pinned staging pool.",
    pageable_bytes: "Bytes copied host→device from ordinary (pageable) memory (rare fallbacks).",
    h2d_copies: "Host→device copies queued.",
    batched_copy_calls: "cuMemcpyBatchAsync calls (each queues many small copies).",
    zero_fills: "Device zero fills queued (meta tensors).",
    direct_read_bytes: "Bytes read from disk with O_DIRECT.",
    buffered_read_bytes: "Bytes read through the page cache with pread.",
    decrypted_in_staging: "Encrypted bytes authenticated and decrypted inside staging buffers.",
    decrypted_on_device: "Encrypted bytes queued for authentication and decryption by the GPU kernels.",
    staging_allocated: "Pinned staging bytes allocated now.",
    peak_staging_allocated: "Most pinned staging bytes allocated at once.",
    staging_in_use: "Pinned staging bytes checked out by loads now.",
    peak_staging_in_use: "Most pinned staging bytes checked out at once.",
    reader_cpu_ns: "CPU time (ns) of the GPU path's reader threads, added as each one ends.",
    pin_cpu_ns: "CPU time (ns) of the threads that page-lock staging buffers ahead of a load.",
}

pub(crate) fn add(c: Counter, n: u64) {
    let (cell, peak) = c.cells();
    let now = cell.fetch_add(n, Ordering::Relaxed) + n;
    if let Some(p) = peak {
        p.fetch_max(now, Ordering::Relaxed);
    }
}

/// Add the calling thread's CPU time so far to `c` (call as the thread ends): says where a
/// load's CPU goes without a profiler.
pub(crate) fn add_thread_cpu(c: Counter) {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-parameter call with a valid clock id.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
        add(c, ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
    }
}

pub(crate) fn sub(c: Counter, n: u64) {
    c.cells().0.fetch_sub(n, Ordering::Relaxed);
}

#[derive(Clone, Copy)]
pub(crate) enum Counter {
    Loads,
    BytesToDevice,
    Staged,
    Pageable,
    Copies,
    BatchCalls,
    ZeroFills,
    DirectRead,
    BufferedRead,
    DecryptedInStaging,
    DecryptedOnDevice,
    StagingAllocated,
    StagingInUse,
    ReaderCpu,
    PinCpu,
}

impl Counter {
    fn cells(self) -> (&'static AtomicU64, Option<&'static AtomicU64>) {
        match self {
            Counter::Loads => (&ALL.loads, None),
            Counter::BytesToDevice => (&ALL.bytes_to_device, None),
            Counter::Staged => (&ALL.staged_bytes, None),
            Counter::Pageable => (&ALL.pageable_bytes, None),
            Counter::Copies => (&ALL.h2d_copies, None),
            Counter::BatchCalls => (&ALL.batched_copy_calls, None),
            Counter::ZeroFills => (&ALL.zero_fills, None),
            Counter::DirectRead => (&ALL.direct_read_bytes, None),
            Counter::BufferedRead => (&ALL.buffered_read_bytes, None),
            Counter::DecryptedInStaging => (&ALL.decrypted_in_staging, None),
            Counter::DecryptedOnDevice => (&ALL.decrypted_on_device, None),
            Counter::StagingAllocated => (&ALL.staging_allocated, Some(&ALL.peak_staging_allocated)),
            Counter::StagingInUse => (&ALL.staging_in_use, Some(&ALL.peak_staging_in_use)),
            Counter::ReaderCpu => (&ALL.reader_cpu_ns, None),
            Counter::PinCpu => (&ALL.pin_cpu_ns, None),
        }
    }
}
