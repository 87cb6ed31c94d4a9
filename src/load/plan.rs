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

impl Item {
    /// Bytes this item reads.
    pub fn bytes(&self) -> u64 {
        match self {
            Item::Segment { len, .. } => *len as u64,
            Item::Direct { len, .. } => *len,
        }
    }
}

/// Whether remote loads call [`Plan::taper`] (`TENSORIZER_RS_TAPER=0`: no, for A/B
/// benchmarks).
pub fn tapering() -> bool {
    std::env::var("TENSORIZER_RS_TAPER").map_or(true, |v| v.trim() != "0")
}

impl Plan {
    /// Split the large pieces near the end so that `readers` taking items in order finish
    /// together: a piece is at most `1 / (2 * readers)` of the bytes from its start to the end
    /// of the plan (guided self-scheduling) but at least `min`, each split into equal parts,
    /// and never larger than it was. Without this the readers holding the last big pieces work alone
    /// while the others idle (over HTTP, one 64 MiB piece is ~35 ms of one connection).
    pub fn taper(&mut self, readers: usize, min: u64) {
        let share = 2 * readers.max(1) as u64;
        let min = min.max(1);
        let mut after: u64 = self.items.iter().map(Item::bytes).sum();
        let mut out = Vec::with_capacity(self.items.len());
        for item in std::mem::take(&mut self.items) {
            after -= item.bytes();
            let Item::Direct { slot, file_offset, offset, len } = item else {
                out.push(item);
                continue;
            };
            // Equal parts (4 KiB multiples), so no sliver is left over: a tiny request costs
            // as much time as a large one.
            let want = ((len + after) / share).max(min);
            let parts = len.div_ceil(want).max(1);
            let size = len.div_ceil(parts).next_multiple_of(4096);
            let mut done = 0;
            while done < len {
                let n = size.min(len - done);
                out.push(Item::Direct { slot, file_offset: file_offset + done, offset: offset + done, len: n });
                done += n;
                if done < len {
                    self.pieces[slot] += 1;
                }
            }
        }
        self.items = out;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn directs(total: u64, piece: u64) -> Plan {
        let mut plan = Plan { items: Vec::new(), pieces: vec![1] };
        let mut off = 0;
        while off < total {
            let len = piece.min(total - off);
            plan.items.push(Item::Direct { slot: 0, file_offset: 100 + off, offset: off, len });
            plan.pieces[0] += 1;
            off += len;
        }
        plan
    }

    #[test]
    fn taper_shrinks_only_the_last_pieces_and_keeps_every_byte() {
        let mut plan = directs(4096 * MIB, 64 * MIB);
        let before = plan.items.len();
        plan.taper(16, 8 * MIB);
        // Contiguous, same bytes, each piece counted for the slot.
        let mut at = 0;
        for it in &plan.items {
            let Item::Direct { file_offset, offset, len, .. } = *it else { panic!("a segment appeared") };
            assert_eq!((offset, file_offset), (at, 100 + at));
            assert!(len <= 64 * MIB && len > 0);
            at += len;
        }
        assert_eq!(at, 4096 * MIB);
        assert_eq!(plan.pieces[0], plan.items.len() + 1);
        assert!(plan.items.len() > before);
        let sizes: Vec<u64> = plan.items.iter().map(Item::bytes).collect();
        // The first half keeps full pieces; in the last eighth of the bytes none is over
        // 16 MiB; the tail is made of `min`-sized pieces, and no piece is a sliver.
        assert!(sizes[..before / 2].iter().all(|&n| n == 64 * MIB));
        let mut rest = 4096 * MIB;
        for &n in &sizes {
            assert!(rest > 512 * MIB || n <= 16 * MIB, "{n} bytes with {rest} to go");
            rest -= n;
        }
        assert!(sizes[sizes.len() - 16..].iter().all(|&n| n == 8 * MIB));
        assert!(sizes.iter().all(|&n| n >= 8 * MIB));
        // A piece that is not a multiple of the smallest size splits evenly.
        let mut odd = directs(24 * MIB + 65536, 64 * MIB);
        odd.taper(16, 8 * MIB);
        let sizes: Vec<u64> = odd.items.iter().map(Item::bytes).collect();
        assert_eq!(sizes.iter().sum::<u64>(), 24 * MIB + 65536);
        assert!(sizes.iter().all(|&n| n >= 6 * MIB), "{sizes:?}");
    }

    #[test]
    fn taper_leaves_segments_and_small_plans_alone() {
        let mut plan = directs(24 * MIB, 8 * MIB);
        plan.items.insert(0, Item::Segment { start: 0, len: 100, parts: Vec::new() });
        let sizes = |p: &Plan| p.items.iter().map(Item::bytes).collect::<Vec<_>>();
        let before = sizes(&plan);
        plan.taper(16, 8 * MIB);
        assert_eq!(sizes(&plan), before);
        assert_eq!(plan.pieces[0], 4);
    }
}
