//! Turning the wanted index entries into reads. Small records are coalesced into one read
//! (few requests for files with thousands of tiny tensors, which matters most on HTTP/S3);
//! large tensors are split into pieces that several readers fetch straight into place, or go
//! whole to one reader when their bytes must pass in order (a hash over a tensor bound for the
//! GPU). A large tensor's header always travels in a segment.
use std::ops::Range;

use crate::crypto::CHUNK_SIZE;
use crate::format::IndexEntry;

/// How a plan cuts a file into reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Records up to this size are read together with their neighbours.
    pub small: u64,
    /// Upper bound for one coalesced read.
    pub segment_max: u64,
    /// Size of one piece of a large tensor.
    pub piece: u64,
}

impl Sizes {
    /// Loads into host memory: pieces land in the tensors' own buffers; 32 MiB is a multiple
    /// of the 2 MiB cipher chunk.
    pub const HOST: Sizes = Sizes { small: 1 << 20, segment_max: 16 << 20, piece: 32 << 20 };

    /// Loads through staging buffers of `chunk` bytes. Segments of small records stay small
    /// enough that files of many tiny tensors still spread over all readers (each record costs
    /// a header check and a copy launch). A local reader splits a piece into buffer-sized
    /// reads; a remote one fetches it with one request streamed through the buffers.
    /// Encrypted files (`sealed_reads`: the most bytes a read takes): pieces are whole numbers
    /// of the reads of whole cipher chunks ([`sealed_step`]), as the pipeline reads them.
    pub fn device(chunk: u64, sealed_reads: Option<u64>) -> Sizes {
        let piece = match sealed_reads.map(|r| sealed_step(r.min(chunk) as usize) as u64) {
            Some(step) if step > 0 => (DEVICE_PIECE / step).max(1) * step,
            _ => DEVICE_PIECE.max(chunk),
        };
        Sizes { small: (chunk / 4).min(1 << 20), segment_max: chunk.min(2 << 20), piece }
    }
}

/// Pieces of large tensors loaded through staging: one ranged request each over the network
/// (one request per 8 MiB buffer cost each reader ~6 ms per request; 64 and 32 MiB pieces
/// were even, docs/benchmarks.md).
const DEVICE_PIECE: u64 = 64 << 20;

/// Bytes of encrypted data one buffer of `chunk` bytes takes per read: whole 2 MiB cipher
/// chunks (0: none fits).
pub fn sealed_step(chunk: usize) -> usize {
    chunk / CHUNK_SIZE * CHUNK_SIZE
}

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
    Piece {
        slot: usize,
        file_offset: u64,
        offset: u64,
        len: u64,
    },
    /// All of a large tensor's data, in order, by one reader.
    Whole {
        slot: usize,
        file_offset: u64,
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
            Item::Piece { len, .. } | Item::Whole { len, .. } => *len,
        }
    }
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
            let Item::Piece { slot, file_offset, offset, len } = item else {
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
                out.push(Item::Piece { slot, file_offset: file_offset + done, offset: offset + done, len: n });
                done += n;
                if done < len {
                    self.pieces[slot] += 1;
                }
            }
        }
        self.items = out;
    }
}

/// `slots[i]` is the index entry of slot `i`. Records up to `sizes.small` bytes are coalesced
/// into segments of at most `sizes.segment_max` bytes; larger tensors are split into
/// `sizes.piece`-byte pieces, or read whole where `whole(slot)` says so. Items come out in file
/// order.
pub fn build(entries: &[IndexEntry], slots: &[usize], sizes: Sizes, whole: impl Fn(usize) -> bool) -> Plan {
    let Sizes { small, segment_max, piece } = sizes;
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
            if whole(slot) {
                plan.items.push(Item::Whole { slot, file_offset: e.data_offset, len: e.data_length });
                plan.pieces[slot] += 1;
                continue;
            }
            let mut off = 0;
            while off < e.data_length {
                let len = piece.min(e.data_length - off);
                plan.items.push(Item::Piece { slot, file_offset: e.data_offset + off, offset: off, len });
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
            plan.items.push(Item::Piece { slot: 0, file_offset: 100 + off, offset: off, len });
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
            let Item::Piece { file_offset, offset, len, .. } = *it else { panic!("a segment appeared") };
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

    /// Records back to back from offset 64: a 100-byte header, then `len` bytes of data each.
    fn entries(lens: &[u64]) -> Vec<IndexEntry> {
        let mut at = 64;
        lens.iter()
            .map(|&len| {
                let e = IndexEntry {
                    name: b"t".to_vec(),
                    tensor_type: 2,
                    dtype: crate::format::dtype::DType::parse(b"|u1").unwrap(),
                    shape: vec![len],
                    header_offset: at,
                    data_offset: at + 100,
                    data_length: len,
                    entry_version: 1,
                };
                at += 100 + len;
                e
            })
            .collect()
    }

    #[test]
    fn small_records_share_segments_and_large_ones_split_or_go_whole() {
        let sizes = Sizes { small: 1000, segment_max: 4000, piece: 5000 };
        let es = entries(&[10, 20, 12_000, 30, 8000]);
        let plan = build(&es, &[0, 1, 2, 3, 4], sizes, |slot| slot == 4);
        let kinds: Vec<String> = plan
            .items
            .iter()
            .map(|it| match it {
                Item::Segment { parts, .. } => format!("S{}", parts.len()),
                Item::Piece { slot, len, .. } => format!("P{slot}:{len}"),
                Item::Whole { slot, len, .. } => format!("W{slot}:{len}"),
            })
            .collect();
        // Two small records and the large one's header; its data in pieces; then the next
        // small record with the last tensor's header, whose data goes whole.
        assert_eq!(kinds, ["S3", "P2:5000", "P2:5000", "P2:2000", "S2", "W4:8000"]);
        assert_eq!(plan.pieces, vec![1, 1, 4, 1, 2]);
        let Item::Segment { parts, .. } = &plan.items[0] else { unreachable!() };
        assert!(parts[2].data.is_none() && parts[0].data.as_ref().unwrap().len() == 10);
        // Slots may name entries in any order; items still come in file order.
        let plan = build(&es, &[3, 0], sizes, |_| false);
        let Item::Segment { parts, .. } = &plan.items[0] else { unreachable!() };
        assert_eq!((plan.items.len(), parts[0].slot), (2, 1));
    }

    #[test]
    fn device_pieces_hold_whole_cipher_reads() {
        let chunk = (8 << 20) - 8192;
        assert_eq!(sealed_step(chunk), 6 << 20);
        assert_eq!(Sizes::device(chunk as u64, Some(chunk as u64)).piece, 60 << 20);
        // Reads of 4 MiB (local files opened on the GPU): pieces of whole reads.
        assert_eq!(Sizes::device(chunk as u64, Some(4 << 20)).piece, 64 << 20);
        assert_eq!(Sizes::device(6 << 20, Some(4 << 20)).piece, 64 << 20);
        assert_eq!(Sizes::device(chunk as u64, None), Sizes { small: 1 << 20, segment_max: 2 << 20, piece: 64 << 20 });
        assert_eq!(sealed_step((2 << 20) - 8192), 0);
        assert_eq!(Sizes::device((2 << 20) - 8192, Some(2 << 20)).piece, 64 << 20);
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
