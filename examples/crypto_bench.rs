//! Throughput of tensor encryption and decryption (XSalsa20-Poly1305, 2 MiB chunks).
//!
//! `cargo run --release --example crypto_bench [MiB]` prints GB/s (10^9 bytes per second):
//! * "1 core": pieces opened one after another on this thread, by wall time and by this
//!   thread's CPU time (the latter is what a core delivers when other processes share it);
//! * "all cores": `decrypt_tensor`, chunks in parallel on rayon's pool;
//! * the `crypto_secretbox` crate on one core, for comparison;
//! * Argon2id derivation times for the libsodium presets.
use std::time::Instant;

use crypto_secretbox::aead::generic_array::GenericArray;
use crypto_secretbox::aead::{AeadInPlace, KeyInit};
use tensorizer_rs::crypto::{self, DecryptPlan, DecryptionKeys, EncryptionKeys};
use tensorizer_rs::format::crypt_info::PwHashParams;

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best (wall, cpu) seconds over `runs`.
fn best_of<F: FnMut()>(runs: usize, mut f: F) -> (f64, f64) {
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..runs {
        let (t, c) = (Instant::now(), thread_cpu());
        f();
        best.0 = best.0.min(t.elapsed().as_secs_f64());
        best.1 = best.1.min(thread_cpu() - c);
    }
    best
}

fn main() {
    let mib: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let len = mib << 20;
    let key = crypto::random_key().unwrap();
    let ek = EncryptionKeys::from_key(key);
    let dk = DecryptionKeys::Key(key);
    let plain: Vec<u8> = (0..len).map(|i| (i * 7 + (i >> 13)) as u8).collect();
    let mut data = plain.clone();
    let info = crypto::encrypt_tensor(&ek, &mut data).unwrap();
    let sealed = data.clone();
    let gbs = |secs: f64| len as f64 / secs / 1e9;
    println!(
        "{mib} MiB, {} chunks, keystream backend {:?}, rayon threads {}",
        len.div_ceil(crypto::CHUNK_SIZE),
        crypto::salsa::backend(),
        rayon::current_num_threads()
    );

    let plan = DecryptPlan::new(&dk, &info, len as u64).unwrap().unwrap();
    let mut scratch = sealed.clone();
    let (w, c) = best_of(5, || {
        scratch.copy_from_slice(&sealed);
        for (i, p) in plan.pieces().iter().enumerate() {
            plan.open_piece(i, &mut scratch[p.range.clone()]).unwrap();
        }
    });
    assert!(scratch == plain);
    // The copy is part of the timed closure: time it alone and subtract.
    let (cw, cc) = best_of(5, || scratch.copy_from_slice(&sealed));
    println!("decrypt, 1 core:     {:.3} GB/s wall, {:.3} GB/s per CPU-second", gbs(w - cw), gbs(c - cc));

    let (w, _) = best_of(5, || {
        scratch.copy_from_slice(&sealed);
        crypto::decrypt_tensor(&dk, &info, &mut scratch).unwrap();
    });
    assert!(scratch == plain);
    println!("decrypt, all cores:  {:.3} GB/s wall", gbs(w - cw));

    let (w, c) = best_of(5, || {
        scratch.copy_from_slice(&plain);
        let cipher = crypto::secretbox::SecretBox::new(&key);
        for (i, chunk) in scratch.chunks_mut(crypto::CHUNK_SIZE).enumerate() {
            std::hint::black_box(cipher.seal(&[i as u8; 24], chunk));
        }
    });
    println!("encrypt, 1 core:     {:.3} GB/s wall, {:.3} GB/s per CPU-second", gbs(w - cw), gbs(c - cc));
    let (w, _) = best_of(5, || {
        scratch.copy_from_slice(&plain);
        crypto::encrypt_tensor(&ek, &mut scratch).unwrap();
    });
    println!("encrypt, all cores:  {:.3} GB/s wall", gbs(w - cw));

    let reference = crypto_secretbox::XSalsa20Poly1305::new(GenericArray::from_slice(&key));
    let (w, c) = best_of(3, || {
        scratch.copy_from_slice(&plain);
        for chunk in scratch.chunks_mut(crypto::CHUNK_SIZE) {
            let tag = reference.encrypt_in_place_detached(GenericArray::from_slice(&[1u8; 24]), b"", chunk).unwrap();
            std::hint::black_box(tag);
        }
    });
    println!("crypto_secretbox crate, 1 core: {:.3} GB/s wall, {:.3} GB/s per CPU-second", gbs(w - cw), gbs(c - cc));

    for (ops, mem) in [(1u64, 8192u64), (2, 64 << 20), (3, 256 << 20)] {
        let p = PwHashParams { opslimit: ops, memlimit: mem, alg: 2, salt: vec![1; 16] };
        let (w, _) = best_of(1, || {
            crypto::derive_key(b"bench passphrase", &p).unwrap();
        });
        println!("argon2id ops={ops} mem={} KiB: {:.3} s", mem >> 10, w);
    }
}
