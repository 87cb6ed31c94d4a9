//! The GPU decryption kernels' math on the CPU: `src/cuda/kernels/secretbox.cu` compiled as
//! C++ with `TZ_HOST_EMULATION` (the CUDA qualifiers defined away, every block and thread run
//! in turn, phase by phase), fed the kernel arguments exactly as `cuda::secretbox` packs them,
//! and checked against the `crypto_secretbox` crate: every length class, chunk runs of one
//! tensor, tampering, wrong keys, unaligned data, more chunks than one launch holds, a grid
//! smaller than the work.
use std::path::PathBuf;
use std::process::Command;

use crypto_secretbox::aead::generic_array::GenericArray;
use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use crypto_secretbox::XSalsa20Poly1305;
use tensorizer_rs::crypto::{self, DecryptPlan, DecryptionKeys, EncryptionKeys};
use tensorizer_rs::cuda::secretbox::{pack_launches, DeviceChunk, Slot, Verdict, SOURCE};

type HostOpen = unsafe extern "C" fn(*const std::ffi::c_void, u32);

struct Emulator {
    open: HostOpen,
    _lib: libloading::Library,
    _dir: tempfile::TempDir,
}

fn emulator() -> &'static Emulator {
    static E: std::sync::OnceLock<Emulator> = std::sync::OnceLock::new();
    E.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("secretbox.cpp");
        std::fs::write(&src, SOURCE).unwrap();
        let so: PathBuf = dir.path().join("libtzhost.so");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-DTZ_HOST_EMULATION", "-o"])
            .arg(&so)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("running the C++ compiler `{cxx}` (set CXX): {e}"));
        assert!(
            out.status.success(),
            "the kernel source does not compile as C++:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: our own library; the symbol has the declared signature.
        unsafe {
            let lib = libloading::Library::new(&so).unwrap();
            let open: HostOpen = *lib.get(b"tz_host_open\0").unwrap();
            Emulator { open, _lib: lib, _dir: dir }
        }
    })
}

/// Run the kernels over `chunks` (data addresses are host addresses here) with `nslots` fresh
/// slots; `grid` overrides the grid size (None: as the launcher sizes it).
fn run(key: &[u8; 32], chunks: &[DeviceChunk], nslots: usize, grid: Option<u32>) -> Vec<Verdict> {
    let mut slots = vec![Slot::default(); nslots];
    for l in pack_launches(key, chunks, slots.as_mut_ptr() as u64, nslots as u32) {
        let g = grid.unwrap_or(l.verify_grid.max(l.decrypt_grid));
        // SAFETY: the argument struct and every address in it are live host memory.
        unsafe { (emulator().open)(&*l.args as *const _ as *const std::ffi::c_void, g) };
    }
    for s in &slots {
        assert_eq!((s.acc, s.arrived), ([0; 5], 0), "the scratch is reset after use");
    }
    slots.iter().map(|s| Verdict::from_raw(s.verdict)).collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn seal(key: &[u8; 32], nonce: &[u8; 24], data: &mut [u8]) -> [u8; 16] {
    let c = XSalsa20Poly1305::new(GenericArray::from_slice(key));
    c.encrypt_in_place_detached(GenericArray::from_slice(nonce), b"", data).unwrap().into()
}

#[test]
fn single_boxes_of_every_length_class_match_the_crate() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let lens = [
        0usize,
        1,
        15,
        16,
        17,
        31,
        32,
        33,
        63,
        64,
        65,
        95,
        96,
        97,
        1000,
        4095,
        4096,
        65535,
        65536,
        65537,
        65536 + 32,
        (2 << 20) - 1,
        2 << 20,
        (3 << 20) + 13,
    ];
    // All in one buffer at offsets 16-aligned, 4-aligned and unaligned, several launches' worth.
    let key: [u8; 32] = rng.bytes(32).try_into().unwrap();
    for shift in [0usize, 4, 1] {
        let total: usize = lens.iter().map(|l| l + 64).sum();
        let mut buf = vec![0u8; total + 64];
        let base = buf.as_ptr() as usize;
        let mut off = (16 - base % 16) % 16 + shift;
        let mut chunks = Vec::new();
        let mut plain = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let nonce: [u8; 24] = rng.bytes(24).try_into().unwrap();
            let p = rng.bytes(len);
            buf[off..off + len].copy_from_slice(&p);
            let mac = seal(&key, &nonce, &mut buf[off..off + len]);
            chunks.push(DeviceChunk::new((base + off) as u64, len as u64, nonce, mac, i as u32));
            plain.push((off, p));
            off += len + 64;
        }
        let v = run(&key, &chunks, lens.len(), None);
        assert!(v.iter().all(|&v| v == Verdict::Authentic), "shift {shift}: {v:?}");
        for (i, (off, p)) in plain.iter().enumerate() {
            assert!(buf[*off..*off + p.len()] == p[..], "shift {shift}: length {} decrypted wrong", lens[i]);
        }
    }
}

/// A tensor sealed as the writer does (2 MiB chunks, nonces n0 + i), opened through its plan's
/// pieces as the pipeline will.
fn sealed_tensor(len: usize, key: [u8; 32], seed: u64) -> (Vec<u8>, Vec<u8>, DecryptPlan) {
    let plain = Rng(seed).bytes(len);
    let mut data = plain.clone();
    let info = crypto::encrypt_tensor(&EncryptionKeys::from_key(key), &mut data).unwrap();
    let plan = DecryptPlan::new(&DecryptionKeys::Key(key), &info, len as u64).unwrap().unwrap();
    (plain, data, plan)
}

#[test]
fn a_multi_chunk_tensor_opens_and_tampering_fails_only_its_chunk() {
    let key = [0x5au8; 32];
    let len = 5 * (2 << 20) + 1234; // 6 chunks, the last short
    let (plain, sealed, plan) = sealed_tensor(len, key, 7);
    let n = plan.pieces().len();
    assert_eq!(n, 6);

    let mut data = sealed.clone();
    let chunks = DeviceChunk::from_pieces(data.as_mut_ptr() as u64, plan.pieces(), 0);
    assert!(run(&key, &chunks, n, None).iter().all(|&v| v == Verdict::Authentic));
    assert!(data == plain);

    // The same with a grid far smaller than the tiles (blocks loop over them).
    let mut data = sealed.clone();
    let chunks = DeviceChunk::from_pieces(data.as_mut_ptr() as u64, plan.pieces(), 0);
    assert!(run(&key, &chunks, n, Some(3)).iter().all(|&v| v == Verdict::Authentic));
    assert!(data == plain);

    // A flipped bit in the first, a middle and the last chunk: that chunk alone is forged and
    // stays ciphertext; the others open.
    for (pos, bad) in [(0, 0), (3 * (2 << 20) + 77, 3), (len - 1, 5)] {
        let mut data = sealed.clone();
        data[pos] ^= 0x10;
        let chunks = DeviceChunk::from_pieces(data.as_mut_ptr() as u64, plan.pieces(), 0);
        let v = run(&key, &chunks, n, None);
        for (i, p) in plan.pieces().iter().enumerate() {
            if i == bad {
                assert_eq!(v[i], Verdict::Forged, "chunk {i} (tampered at {pos})");
                let mut want = sealed[p.range.clone()].to_vec();
                want[pos - p.range.start] ^= 0x10;
                assert!(data[p.range.clone()] == want[..], "a forged chunk is left as it was");
            } else {
                assert_eq!(v[i], Verdict::Authentic, "chunk {i} (tampered at {pos})");
                assert!(data[p.range.clone()] == plain[p.range.clone()]);
            }
        }
    }

    // A tampered MAC.
    let mut data = sealed.clone();
    let mut chunks = DeviceChunk::from_pieces(data.as_mut_ptr() as u64, plan.pieces(), 0);
    chunks[2].mac[15] ^= 0x80;
    let v = run(&key, &chunks, n, None);
    assert_eq!(v.iter().filter(|&&v| v == Verdict::Forged).count(), 1);
    assert_eq!(v[2], Verdict::Forged);

    // A wrong key: every chunk forged, nothing decrypted.
    let mut data = sealed.clone();
    let chunks = DeviceChunk::from_pieces(data.as_mut_ptr() as u64, plan.pieces(), 0);
    let mut wrong = key;
    wrong[0] ^= 1;
    assert!(run(&wrong, &chunks, n, None).iter().all(|&v| v == Verdict::Forged));
    assert!(data == sealed);

    // Swapped chunks: each MAC is bound to its nonce.
    let mut data = sealed.clone();
    let (a, b) = data.split_at_mut(2 << 20);
    a.swap_with_slice(&mut b[..2 << 20]);
    let chunks = DeviceChunk::from_pieces(data.as_mut_ptr() as u64, plan.pieces(), 0);
    let v = run(&key, &chunks, n, None);
    assert_eq!((v[0], v[1], v[2]), (Verdict::Forged, Verdict::Forged, Verdict::Authentic));
}

type Sealed = (Vec<u8>, Vec<u8>, [u8; 24], [u8; 16]);

#[test]
fn many_small_tensors_span_several_launches_and_unused_slots_stay_pending() {
    let key = [9u8; 32];
    let mut rng = Rng(99);
    // (plaintext, ciphertext, nonce, mac)
    let mut bufs: Vec<Sealed> = (0..75)
        .map(|i| {
            let len = (rng.next() % 3000) as usize + i % 2;
            let p = rng.bytes(len);
            let nonce: [u8; 24] = rng.bytes(24).try_into().unwrap();
            let mut c = p.clone();
            let mac = seal(&key, &nonce, &mut c);
            (p, c, nonce, mac)
        })
        .collect();
    // Slots in reverse order, with two spare slots that no chunk names.
    let chunks: Vec<DeviceChunk> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, (_, c, nonce, mac))| {
            DeviceChunk::new(c.as_mut_ptr() as u64, c.len() as u64, *nonce, *mac, 76 - i as u32)
        })
        .collect();
    let v = run(&key, &chunks, 77, None);
    assert_eq!(&v[..2], &[Verdict::Pending, Verdict::Pending]);
    assert!(v[2..].iter().all(|&v| v == Verdict::Authentic));
    assert!(bufs.iter().all(|(p, c, _, _)| p == c));
}

#[test]
fn random_boxes_match_the_crate() {
    let mut rng = Rng(0xfeed_beef);
    for case in 0..40 {
        let key: [u8; 32] = rng.bytes(32).try_into().unwrap();
        let nonce: [u8; 24] = rng.bytes(24).try_into().unwrap();
        let len = match case % 4 {
            0 => (rng.next() % 100) as usize,
            1 => (rng.next() % 70_000) as usize,
            2 => (rng.next() % (2 << 20)) as usize,
            _ => 65536 * (1 + (rng.next() % 8) as usize) + (rng.next() % 64) as usize,
        };
        let plain = rng.bytes(len);
        let mut data = plain.clone();
        let mac = seal(&key, &nonce, &mut data);
        let mut tampered = data.clone();
        let chunk = DeviceChunk::new(data.as_mut_ptr() as u64, len as u64, nonce, mac, 0);
        assert_eq!(run(&key, &[chunk], 1, None), [Verdict::Authentic], "case {case}, len {len}");
        assert!(data == plain, "case {case}, len {len}");
        if len > 0 {
            let pos = (rng.next() % len as u64) as usize;
            tampered[pos] ^= 1 << (rng.next() % 8);
            let chunk = DeviceChunk::new(tampered.as_mut_ptr() as u64, len as u64, nonce, mac, 0);
            assert_eq!(run(&key, &[chunk], 1, None), [Verdict::Forged], "case {case}, len {len}, byte {pos}");
        }
    }
}
