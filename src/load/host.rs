//! Loads into host memory: each tensor gets a fresh buffer, and the pipeline's reads of its
//! data land straight in it; segments of small records go through a reader's scratch buffer.
//! The pipeline decrypts and hashes each tensor there, whole, once its last piece is in.
use std::ops::Range;

use super::file::TensorFile;
use super::options::{self, LoadOptions, Tuning};
use super::pipeline::{self, Destination, To, Window};
use super::plan::{self, Sizes};
use crate::buffer::HostBuffer;
use crate::error::Result;

pub struct LoadedTensor {
    pub entry: usize,
    pub module_idx: u16,
    pub data: HostBuffer,
}

/// Load the index entries `which` into fresh host buffers, returned in the same order.
/// `tick` runs on the calling thread about every [`pipeline::TICK`] while the readers work; an
/// error from it stops the load (the bindings check Python's signals there, so Ctrl-C works).
pub fn load_to_host(
    file: &TensorFile,
    which: &[usize],
    opts: &LoadOptions,
    tick: Option<&mut dyn FnMut() -> Result<()>>,
) -> Result<Vec<LoadedTensor>> {
    options::env().check()?;
    pipeline::check_keys(file, opts.keys.as_ref())?;
    let caps = file.source().caps();
    let opts = &*opts.for_source(caps);
    let name = file.name();
    let mut buffers = Vec::with_capacity(which.len());
    for &i in which {
        let e = &file.entries[i];
        let nbytes = e.expected_nbytes().map_err(|err| err.in_tensor(&e.name_lossy()).in_file(name))?;
        // Meta tensors (no data in the file) are zeros: lazily zeroed pages cost nothing.
        let buf = HostBuffer::new(nbytes as usize, e.data_length == 0)
            .map_err(|err| err.in_tensor(&e.name_lossy()).in_file(name))?;
        buffers.push(buf);
    }
    crate::trace::mark("host_buffers_made", which.len() as u64, 0);
    let tuning = Tuning::host(opts, caps);
    let mut plan = plan::build(&file.entries, which, Sizes::HOST, |_| false);
    if let Some(min) = tuning.taper {
        plan.taper(tuning.readers, min);
    }
    let dest = Host { tensors: buffers.iter().map(|b| Memory { ptr: b.as_ptr(), len: b.len() }).collect() };
    let (module_idx, _) = pipeline::run(file, &dest, which, opts, &tuning, plan, tick)?;
    Ok(which
        .iter()
        .zip(module_idx)
        .zip(buffers)
        .map(|((&entry, module_idx), data)| LoadedTensor { entry, module_idx, data })
        .collect())
}

/// A tensor's buffer, written by the readers in disjoint ranges.
#[derive(Clone, Copy)]
struct Memory {
    ptr: *mut u8,
    len: usize,
}

struct Host {
    tensors: Vec<Memory>,
}

// The buffers outlive the load; the plan gives each byte range of them to exactly one item.
unsafe impl Sync for Host {}

enum HostWindow {
    /// Part of a tensor's own buffer.
    Tensor(Memory),
    /// A reader's scratch buffer (a segment), given back when placed.
    Scratch(Vec<u8>),
}

// A tensor window is a range of a buffer only this reader writes.
unsafe impl Send for HostWindow {}

impl Window for HostWindow {
    fn bytes(&mut self) -> &mut [u8] {
        match self {
            // SAFETY: a range inside a live buffer that the plan gives to this item alone.
            HostWindow::Tensor(m) => unsafe { std::slice::from_raw_parts_mut(m.ptr, m.len) },
            HostWindow::Scratch(v) => v,
        }
    }
}

impl Destination for Host {
    /// The reader's scratch buffer for segments.
    type Lane = Vec<u8>;
    type Window = HostWindow;
    const KEEPS_WHOLE: bool = true;
    const POOLED: bool = false;
    const READER: &'static str = "tz-read";

    fn lane(&self, _reader: usize) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn window_cap(&self) -> usize {
        usize::MAX
    }
    fn window(&self, lane: &mut Vec<u8>, to: To, len: usize) -> Result<HostWindow> {
        Ok(match to {
            To::Segment => {
                let mut scratch = std::mem::take(lane);
                scratch.resize(len, 0);
                HostWindow::Scratch(scratch)
            }
            To::Tensor { slot, offset } => {
                let t = self.tensors[slot];
                assert!(offset as usize + len <= t.len, "a read past its tensor's buffer");
                // SAFETY: inside the buffer (checked above).
                HostWindow::Tensor(Memory { ptr: unsafe { t.ptr.add(offset as usize) }, len })
            }
        })
    }
    fn place(
        &self,
        lane: &mut Vec<u8>,
        w: HostWindow,
        _at: usize,
        _slot: usize,
        _offset: u64,
        _len: usize,
    ) -> Result<()> {
        // The bytes were read where they belong.
        if let HostWindow::Scratch(v) = w {
            *lane = v;
        }
        Ok(())
    }
    fn place_parts(&self, lane: &mut Vec<u8>, w: HostWindow, at: usize, parts: &[(usize, Range<usize>)]) -> Result<()> {
        let HostWindow::Scratch(scratch) = w else { unreachable!("segments are read into scratch") };
        for (slot, range) in parts {
            let t = self.tensors[*slot];
            assert!(range.len() <= t.len, "a record larger than its tensor");
            // SAFETY: the whole of the tensor's buffer (sizes checked when it was made); the
            // plan gives a small tensor's data to its segment alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(t.ptr, range.len()) };
            dst.copy_from_slice(&scratch[at + range.start..at + range.end]);
        }
        *lane = scratch;
        Ok(())
    }
    fn zero(&self, _lane: &mut Vec<u8>, _slot: usize) -> Result<()> {
        Ok(()) // meta tensors' buffers are zeroed when made
    }
    unsafe fn landed(&self, slot: usize) -> &mut [u8] {
        let t = self.tensors[slot];
        // SAFETY: the caller's contract: the tensor's reads are done and it is the only user.
        unsafe { std::slice::from_raw_parts_mut(t.ptr, t.len) }
    }
}
