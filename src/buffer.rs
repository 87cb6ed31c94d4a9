//! Owned, aligned host memory that tensors are read straight into and handed to Python
//! through DLPack without another copy; and a copy that bypasses the CPU caches.
use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Page alignment keeps large buffers usable for O_DIRECT reads and pinned registration.
const ALIGN: usize = 4096;
/// Buffers this large ask for transparent huge pages, so the reads that fill them fault 2 MiB
/// at a time instead of 4 KiB: 24.3 GB/s from the page cache instead of 14.4 on an H200 host
/// (docs/benchmarks.md).
const HUGE_MIN: usize = 4 << 20;
/// They also start on a huge-page boundary: a large allocation is its own mapping, which the
/// kernel places on such a boundary, so a page-aligned buffer would start just past it and
/// fault its first 2 MiB in 4 KiB pages (511 faults a tensor). The skipped head is address
/// space; only the allocator's header, in its last page, is touched (with THP
/// `enabled=always` too, RssAnon stays the tensors' size: checked on the development VM).
const HUGE_ALIGN: usize = 2 << 20;

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
        let align = match (zeroed, len >= HUGE_MIN) {
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

/// `dst.copy_from_slice(src)` with non-temporal stores where the CPU has AVX2: for a
/// destination that the CPU does not read next (a staging buffer the GPU copies from), filling
/// the caches with it only costs bandwidth.
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; both slices hold `src.len()` bytes and cannot overlap (one
        // is borrowed mutably).
        unsafe { copy_streaming_avx2(dst.as_mut_ptr(), src.as_ptr(), src.len()) };
        return;
    }
    dst.copy_from_slice(src);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_streaming_avx2(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): all accesses stay within `len` bytes of `src`/`dst`; stores are to
    // 32-byte aligned addresses after the head.
    unsafe {
        let head = dst.align_offset(32).min(len);
        std::ptr::copy_nonoverlapping(src, dst, head);
        let mut i = head;
        while i + 128 <= len {
            let s = src.add(i) as *const __m256i;
            let d = dst.add(i) as *mut __m256i;
            let (a, b, c, e) = (
                _mm256_loadu_si256(s),
                _mm256_loadu_si256(s.add(1)),
                _mm256_loadu_si256(s.add(2)),
                _mm256_loadu_si256(s.add(3)),
            );
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            _mm256_stream_si256(d.add(2), c);
            _mm256_stream_si256(d.add(3), e);
            i += 128;
        }
        while i + 32 <= len {
            _mm256_stream_si256(dst.add(i) as *mut __m256i, _mm256_loadu_si256(src.add(i) as *const __m256i));
            i += 32;
        }
        std::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_copy_matches_memcpy_at_any_alignment() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for (s_off, d_off, len) in [(0, 0, 0), (1, 3, 31), (5, 0, 128), (3, 17, 4099), (0, 1, 65_000), (9, 31, 33)] {
            let mut dst = vec![0xAAu8; len + 64];
            copy_streaming(&mut dst[d_off..d_off + len], &src[s_off..s_off + len]);
            assert_eq!(&dst[d_off..d_off + len], &src[s_off..s_off + len], "{s_off} {d_off} {len}");
            assert!(dst[..d_off].iter().all(|&b| b == 0xAA) && dst[d_off + len..].iter().all(|&b| b == 0xAA));
        }
    }

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
