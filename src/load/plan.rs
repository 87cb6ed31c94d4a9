//! Turning the wanted index entries into reads. Small records are coalesced into one read
//! (few requests for files with thousands of tiny tensors, which matters most on HTTP/S3);
//! large tensors are split into pieces that several readers fetch straight into place.
use std::ops::Range;

use crate::format::IndexEntry;

/// Records up to this size are read together with their neighbours.
pub const SMALL_RECORD: u64 = 1 << 20;
/// Upper bound for one coalesced read.
pub const SEGMENT_MAX: u64 = 16 << 20;
/// Size of one direct piece of a large tensor; a multiple of the 2 MiB cipher chunk.
pub const PIECE: u64 = 32 << 20;

/// A part of a coalesced segment: ranges are relative to the segment's start.
#[derive(Debug, Clone)]
pub struct SegmentPart {
    pub slot: usize,
    pub header: Range<usize>,
    /// The data, unless it is read directly (large tensors).
    pub data: Option<Range<usize>>,
}

#[derive(Debug, Clone)]
pub enum Item {
    Segment {
        start: u64,
        len: usize,
        parts: Vec<SegmentPart>,
    },
    /// Bytes `offset..offset + len` of a large tensor's data.
    Direct {
        slot: usize,
        file_offset: u64,
        offset: u64,
        len: u64,
    },
}

#[derive(Debug, Default)]
pub struct Plan {
    pub items: Vec<Item>,
    /// How many items touch each slot; the last one to finish finalizes the tensor.
    pub pieces: Vec<usize>,
}

/// `slots[i]` is the index entry of slot `i`. Items come out in file order.
pub fn build(entries: &[IndexEntry], slots: &[usize]) -> Plan {
    build_sized(entries, slots, SMALL_RECORD, SEGMENT_MAX, PIECE)
}

/// [`build`] with explicit sizes: records up to `small` bytes are coalesced into segments of at
/// most `segment_max` bytes; larger tensors are split into `piece`-byte direct reads. The GPU
/// path sizes these to its staging buffers.
pub fn build_sized(entries: &[IndexEntry], slots: &[usize], small: u64, segment_max: u64, piece: u64) -> Plan {
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_by_key(|&s| entries[slots[s]].header_offset);
    let mut plan = Plan { items: Vec::new(), pieces: vec![0; slots.len()] };
    let mut seg: Option<(u64, u64, Vec<SegmentPart>)> = None;
    let flush = |seg: &mut Option<(u64, u64, Vec<SegmentPart>)>, items: &mut Vec<Item>| {
        if let Some((start, end, parts)) = seg.take() {
            items.push(Item::Segment { start, len: (end - start) as usize, parts });
        }
    };
    for slot in order {
        let e = &entries[slots[slot]];
        let record_end = e.data_offset + e.data_length;
        let large = record_end - e.header_offset > small;
        let read_end = if large { e.data_offset } else { record_end };
        let fits = matches!(&seg, Some((s, end, _)) if *end == e.header_offset && read_end - s <= segment_max);
        if !fits {
            flush(&mut seg, &mut plan.items);
            seg = Some((e.header_offset, e.header_offset, Vec::new()));
        }
        let (start, end, parts) = seg.as_mut().expect("segment just opened");
        let rel = |x: u64| (x - *start) as usize;
        parts.push(SegmentPart {
            slot,
            header: rel(e.header_offset)..rel(e.data_offset),
            data: (!large).then(|| rel(e.data_offset)..rel(record_end)),
        });
        *end = read_end;
        plan.pieces[slot] += 1;
        if large {
            flush(&mut seg, &mut plan.items);
            let mut off = 0;
            while off < e.data_length {
                let len = piece.min(e.data_length - off);
                plan.items.push(Item::Direct { slot, file_offset: e.data_offset + off, offset: off, len });
                plan.pieces[slot] += 1;
                off += len;
            }
        }
    }
    flush(&mut seg, &mut plan.items);
    plan
}
