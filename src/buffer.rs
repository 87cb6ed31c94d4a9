//! Owned, aligned host memory that tensors are read straight into and handed to Python
//! through DLPack without another copy.
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Page alignment keeps large buffers usable for O_DIRECT reads and pinned registration.
const ALIGN: usize = 4096;
/// Buffers this large ask for transparent huge pages, so the reads that fill them fault 2 MiB
/// at a time instead of 4 KiB (`TENSORIZER_RS_HUGEPAGES=0` turns this off).
const HUGE_MIN: usize = 4 << 20;
/// On Linux they are also mappings of their own that start on a huge-page boundary. A buffer
/// from the allocator started 4 KiB past one (its mapping's header page), so its first 2 MiB
/// faulted in 4 KiB pages: 511 faults a tensor. Asking the allocator for 2 MiB alignment
/// instead leaves its header in the skipped head, which a host with THP `enabled=always` backs
/// with a whole huge page per buffer; mapping it ourselves leaves no head at all.
const HUGE_ALIGN: usize = 2 << 20;

fn huge_pages() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TENSORIZER_RS_HUGEPAGES").map_or(true, |v| v != "0"))
}

pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    /// How the memory was obtained, to give it back the same way.
    backing: Backing,
}

#[derive(Clone, Copy)]
enum Backing {
    /// From the global allocator with this alignment.
    Heap(usize),
    /// An anonymous mapping of this many bytes (Linux, large buffers).
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Mapped(usize),
}

// The buffer owns its memory exclusively; it is plain bytes.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Allocate `len` bytes; `zeroed` gives lazily zero-filled pages (meta tensors).
    /// Allocation failure is an error, never an abort: lengths can come from untrusted files.
    pub fn new(len: usize, zeroed: bool) -> Result<Self> {
        if len == 0 {
            return Ok(HostBuffer { ptr: NonNull::<u64>::dangling().cast(), len, backing: Backing::Heap(ALIGN) });
        }
        #[cfg(target_os = "linux")]
        if !zeroed && len >= HUGE_MIN && huge_pages() {
            return Self::mapped(len);
        }
        // Small alignment for zeroed memory lets the allocator use calloc, whose fresh pages
        // cost nothing until touched.
        let align = if zeroed { 16 } else { ALIGN };
        let layout =
            Layout::from_size_align(len, align).map_err(|_| Error::value(format!("cannot allocate {len} bytes")))?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe {
            if zeroed {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::value(format!("out of memory allocating {len} bytes")))?;
        Ok(HostBuffer { ptr, len, backing: Backing::Heap(align) })
    }

    /// A mapping of `len` bytes (rounded up to pages) starting on a huge-page boundary:
    /// map 2 MiB more, then unmap the unaligned head and the rest of the tail.
    #[cfg(target_os = "linux")]
    fn mapped(len: usize) -> Result<Self> {
        let oom = || Error::value(format!("out of memory allocating {len} bytes"));
        let size = len.checked_next_multiple_of(ALIGN).ok_or_else(oom)?;
        let span = size.checked_add(HUGE_ALIGN).ok_or_else(oom)?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(oom());
        }
        let head = (raw as usize).next_multiple_of(HUGE_ALIGN) - raw as usize;
        // SAFETY: both ranges lie inside the mapping just made and outside the part kept;
        // unmapping them cannot fail for page-aligned ranges of a mapping we own.
        let start = unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            let start = (raw as *mut u8).add(head);
            if span - head > size {
                libc::munmap(start.add(size) as *mut libc::c_void, span - head - size);
            }
            // Advice only: at worst the kernel ignores it (THP `enabled=never`).
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
            start
        };
        let ptr = NonNull::new(start).ok_or_else(oom)?;
        Ok(HostBuffer { ptr, len, backing: Backing::Mapped(size) })
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        match self.backing {
            // SAFETY: allocated in `new` with this exact layout.
            Backing::Heap(align) => unsafe {
                alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, align))
            },
            #[cfg(target_os = "linux")]
            // SAFETY: the mapping made in `mapped`, exactly this range.
            Backing::Mapped(size) => unsafe {
                libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, size);
            },
            #[cfg(not(target_os = "linux"))]
            Backing::Mapped(_) => unreachable!("mappings are made on Linux only"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_start_on_a_huge_page() {
        let mut big = HostBuffer::new(HUGE_MIN + 12345, false).unwrap();
        assert_eq!(big.as_ptr() as usize % HUGE_ALIGN, 0);
        big.as_mut_slice().fill(7);
        assert!(big.as_slice().iter().all(|&b| b == 7));
        let small = HostBuffer::new(HUGE_MIN - 1, false).unwrap();
        assert_eq!(small.as_ptr() as usize % ALIGN, 0);
        let zeroed = HostBuffer::new(HUGE_MIN + 1, true).unwrap();
        assert!(zeroed.as_slice().iter().all(|&b| b == 0));
        let huge = HostBuffer::new(usize::MAX - 4096, false);
        assert!(huge.is_err());
    }
}
