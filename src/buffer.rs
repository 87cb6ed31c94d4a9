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
/// They also start on a huge-page boundary: a large allocation is its own mapping, which the
/// kernel places on such a boundary, so a page-aligned buffer would start just past it and
/// fault its first 2 MiB in 4 KiB pages (511 faults a tensor). The skipped head is address
/// space; only the allocator's header, in its last page, is touched (with THP
/// `enabled=always` too, RssAnon stays the tensors' size: checked on the development VM).
const HUGE_ALIGN: usize = 2 << 20;

fn huge_pages() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TENSORIZER_RS_HUGEPAGES").map_or(true, |v| v != "0"))
}

pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// The buffer owns its memory exclusively; it is plain bytes.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// Allocate `len` bytes; `zeroed` gives lazily zero-filled pages (meta tensors).
    /// Allocation failure is an error, never an abort: lengths can come from untrusted files.
    pub fn new(len: usize, zeroed: bool) -> Result<Self> {
        if len == 0 {
            return Ok(HostBuffer { ptr: NonNull::<u64>::dangling().cast(), len, align: ALIGN });
        }
        // Small alignment for zeroed memory lets the allocator use calloc, whose fresh pages
        // cost nothing until touched.
        let align = match (zeroed, len >= HUGE_MIN && huge_pages()) {
            (true, _) => 16,
            (false, true) => HUGE_ALIGN,
            (false, false) => ALIGN,
        };
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
        #[cfg(target_os = "linux")]
        if align == HUGE_ALIGN {
            // SAFETY: advice on memory we just allocated (page-aligned); it never fails the
            // allocation, at worst the kernel ignores it.
            unsafe { libc::madvise(raw as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
        Ok(HostBuffer { ptr, len, align })
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
        if self.len > 0 {
            // SAFETY: allocated in `new` with this exact layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, self.align)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_start_on_a_huge_page() {
        let big = HostBuffer::new(HUGE_MIN + 12345, false).unwrap();
        assert_eq!(big.as_ptr() as usize % HUGE_ALIGN, 0);
        let small = HostBuffer::new(HUGE_MIN - 1, false).unwrap();
        assert_eq!(small.as_ptr() as usize % ALIGN, 0);
        let zeroed = HostBuffer::new(HUGE_MIN + 1, true).unwrap();
        assert!(zeroed.as_slice().iter().all(|&b| b == 0));
    }
}
