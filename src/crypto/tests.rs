use super::kdf::{MEMLIMIT_MAX, MEMLIMIT_MIN, OPSLIMIT_MIN};
use super::*;
use crate::error::ErrorKind;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 11)) as u8).collect()
}

fn parallel_chunk(info: &CryptInfo) -> (&u64, &[u8; NONCE_LEN], &Vec<[u8; MAC_LEN]>) {
    match info.cipher().unwrap().unwrap() {
        CryptChunk::XSalsa20Parallel { chunk_size, nonce, macs } => (chunk_size, nonce, macs),
        other => panic!("unexpected cipher chunk {other:?}"),
    }
}

#[test]
fn nonce_add_is_a_192_bit_little_endian_increment() {
    let mut n = [0u8; NONCE_LEN];
    assert_eq!(nonce_add(&n, 0), n);
    let mut one = [0u8; NONCE_LEN];
    one[0] = 1;
    assert_eq!(nonce_add(&n, 1), one);
    n[0] = 0xff;
    let r = nonce_add(&n, 1);
    assert_eq!(&r[..2], &[0, 1]);
    // Carry across a 64-bit limb boundary.
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let r = nonce_add(&n, 2);
    assert_eq!(&r[..8], &1u64.to_le_bytes());
    assert_eq!(r[8], 1);
    // Wraps mod 2^192.
    let all = [0xffu8; NONCE_LEN];
    assert_eq!(nonce_add(&all, 1), [0u8; NONCE_LEN]);
    let mut two = [0u8; NONCE_LEN];
    two[0] = 2;
    assert_eq!(nonce_add(&all, 3), two);
    // Matches repeated single increments (sodium_increment).
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
    n[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut step = n;
    for _ in 0..7 {
        step = nonce_add(&step, 1);
    }
    assert_eq!(nonce_add(&n, 7), step);
}

#[test]
fn round_trip_at_chunk_boundaries() {
    let keys = EncryptionKeys::from_key([7u8; 32]);
    let dk = DecryptionKeys::Key([7u8; 32]);
    for len in [1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 5 * (1 << 20) + 3] {
        let plain = pattern(len);
        let mut data = plain.clone();
        let info = encrypt_tensor(&keys, &mut data).unwrap();
        // A 1-byte ciphertext equals its plaintext once in 256 (random nonce): compare only
        // lengths where a match cannot happen by chance.
        if len >= 16 {
            assert_ne!(data, plain, "len {len}: data was not encrypted");
        }
        assert_eq!(info.chunks.len(), 1);
        let (chunk_size, _, macs) = parallel_chunk(&info);
        assert_eq!(*chunk_size, CHUNK_SIZE as u64);
        assert_eq!(macs.len(), len.div_ceil(CHUNK_SIZE));
        // The crypt info survives encoding.
        let enc = info.encode();
        assert_eq!(CryptInfo::parse(&enc[8..]).unwrap(), info);
        decrypt_tensor(&dk, &info, &mut data).unwrap();
        assert!(data == plain, "len {len}: round trip differs");
    }
}

#[test]
fn empty_data_gets_no_chunks_and_decrypts_to_nothing() {
    let keys = EncryptionKeys::from_key([1u8; 32]);
    let info = encrypt_tensor(&keys, &mut []).unwrap();
    assert!(info.chunks.is_empty());
    let mut keys2 = keys.clone();
    keys2.kdf = Some(PwHashParams { opslimit: 1, memlimit: 8192, alg: 2, salt: vec![0; 16] });
    assert!(encrypt_tensor(&keys2, &mut []).unwrap().chunks.is_empty());
    assert!(Encryptor::new(keys2).encrypt(&mut []).unwrap().chunks.is_empty());
    // An empty crypt info (meta tensor) or a cipher chunk with 0 MACs over 0 bytes: nothing to do,
    // and no key is derived even for a passphrase.
    let pw = DecryptionKeys::passphrase(b"x".to_vec());
    decrypt_tensor(&pw, &CryptInfo::default(), &mut []).unwrap();
    let zero_macs = CryptInfo {
        chunks: vec![CryptChunk::XSalsa20Parallel { chunk_size: CHUNK_SIZE as u64, nonce: [0; 24], macs: vec![] }],
    };
    decrypt_tensor(&pw, &zero_macs, &mut []).unwrap();
}

#[test]
fn unencrypted_tensor_with_data_is_refused() {
    let err = decrypt_tensor(&DecryptionKeys::Key([0; 32]), &CryptInfo::default(), &mut [1, 2, 3]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Crypto);
}

#[test]
fn tampering_and_wrong_keys_fail() {
    let key = [0x42u8; 32];
    let keys = EncryptionKeys::from_key(key);
    let dk = DecryptionKeys::Key(key);
    let len = 2 * CHUNK_SIZE + 1000;
    let plain = pattern(len);
    let mut sealed = plain.clone();
    let info = encrypt_tensor(&keys, &mut sealed).unwrap();

    // A flipped ciphertext bit, in the first, a middle and the last chunk.
    for pos in [0, CHUNK_SIZE + 5, len - 1] {
        let mut data = sealed.clone();
        data[pos] ^= 0x01;
        let err = decrypt_tensor(&dk, &info, &mut data).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Crypto);
        assert_eq!(err.message, AUTH_FAILED);
    }
    // A flipped MAC bit.
    let mut bad = info.clone();
    if let CryptChunk::XSalsa20Parallel { macs, .. } = &mut bad.chunks[0] {
        macs[1][15] ^= 0x80;
    }
    let err = decrypt_tensor(&dk, &bad, &mut sealed.clone()).unwrap_err();
    assert_eq!(err.message, AUTH_FAILED);
    // A different nonce.
    let mut bad = info.clone();
    if let CryptChunk::XSalsa20Parallel { nonce, .. } = &mut bad.chunks[0] {
        nonce[23] ^= 1;
    }
    assert!(decrypt_tensor(&dk, &bad, &mut sealed.clone()).is_err());
    // Swapped chunks (each MAC is bound to its nonce).
    let mut swapped = sealed.clone();
    let (a, b) = swapped.split_at_mut(CHUNK_SIZE);
    a.swap_with_slice(&mut b[..CHUNK_SIZE]);
    assert!(decrypt_tensor(&dk, &info, &mut swapped).is_err());
    // A wrong key.
    let mut wrong = [0x42u8; 32];
    wrong[31] = 0;
    let err = decrypt_tensor(&DecryptionKeys::Key(wrong), &info, &mut sealed.clone()).unwrap_err();
    assert_eq!(err.message, AUTH_FAILED);
    // And the untouched data still opens.
    let mut data = sealed.clone();
    decrypt_tensor(&dk, &info, &mut data).unwrap();
    assert!(data == plain);
}

#[test]
fn mac_count_must_match_the_data() {
    let keys = EncryptionKeys::from_key([3u8; 32]);
    let dk = DecryptionKeys::Key([3u8; 32]);
    let mut data = pattern(3 * CHUNK_SIZE);
    let info = encrypt_tensor(&keys, &mut data).unwrap();
    // Truncated data: 3 MACs but only 2 chunks of bytes.
    let err = decrypt_tensor(&dk, &info, &mut data[..2 * CHUNK_SIZE]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Format);
    // No MACs at all for non-empty data.
    let none = CryptInfo {
        chunks: vec![CryptChunk::XSalsa20Parallel { chunk_size: CHUNK_SIZE as u64, nonce: [0; 24], macs: vec![] }],
    };
    assert!(decrypt_tensor(&dk, &none, &mut [1u8; 10]).is_err());
    // Two cipher chunks.
    let mut two = info.clone();
    two.chunks.push(two.chunks[0].clone());
    assert!(decrypt_tensor(&dk, &two, &mut data).is_err());
}

#[test]
fn single_mac_covers_all_data_whatever_the_chunk_size() {
    let key = [9u8; 32];
    let nonce = [5u8; 24];
    let plain = pattern(3 * CHUNK_SIZE + 17);
    let mut data = plain.clone();
    let mac = SecretBox::new(&key).seal(&nonce, &mut data);
    let dk = DecryptionKeys::Key(key);
    // Type 2 with one MAC: one box over everything even though chunk_size is smaller.
    let par = CryptInfo {
        chunks: vec![CryptChunk::XSalsa20Parallel { chunk_size: CHUNK_SIZE as u64, nonce, macs: vec![mac] }],
    };
    let mut d = data.clone();
    decrypt_tensor(&dk, &par, &mut d).unwrap();
    assert!(d == plain);
    // Type 3 (sequential): the same single box.
    let seq = CryptInfo { chunks: vec![CryptChunk::XSalsa20Sequential { nonce, mac }] };
    let mut d = data.clone();
    decrypt_tensor(&dk, &seq, &mut d).unwrap();
    assert!(d == plain);
}

#[test]
fn plan_opens_piece_by_piece() {
    let key = [11u8; 32];
    let keys = EncryptionKeys::from_key(key);
    let plain = pattern(2 * CHUNK_SIZE + 9);
    let mut data = plain.clone();
    let info = encrypt_tensor(&keys, &mut data).unwrap();
    let plan = DecryptPlan::new(&DecryptionKeys::Key(key), &info, data.len() as u64).unwrap().unwrap();
    assert_eq!(plan.pieces().len(), 3);
    assert_eq!(plan.pieces()[2].range, 2 * CHUNK_SIZE..2 * CHUNK_SIZE + 9);
    for (i, p) in plan.pieces().iter().enumerate().rev() {
        plan.open_piece(i, &mut data[p.range.clone()]).unwrap();
    }
    assert!(data == plain);
    assert!(plan.open_piece(3, &mut []).is_err());
    assert!(plan.open_piece(0, &mut [0u8; 5]).is_err());
    assert!(plan.open_all(&mut [0u8; 5]).is_err());
    assert!(DecryptPlan::new(&DecryptionKeys::Key(key), &info, 0).unwrap().is_none());
}

#[test]
fn encryptor_uses_fresh_nonces_and_records_them() {
    let enc = Encryptor::new(EncryptionKeys::from_key([2u8; 32]));
    let mut seen = HashSet::new();
    for len in [10, 3 * CHUNK_SIZE, 1] {
        let mut data = pattern(len);
        let info = enc.encrypt(&mut data).unwrap();
        let (_, nonce, macs) = parallel_chunk(&info);
        for i in 0..macs.len() as u64 {
            assert!(seen.insert(nonce_add(nonce, i)));
        }
        let mut copy = data.clone();
        decrypt_tensor(&DecryptionKeys::Key([2u8; 32]), &info, &mut copy).unwrap();
        assert!(copy == pattern(len));
    }
    assert_eq!(enc.used.lock().unwrap().len(), seen.len());
}

#[test]
fn passphrase_needs_a_kdf_chunk() {
    let keys = EncryptionKeys::from_key([4u8; 32]);
    let mut data = pattern(100);
    let info = encrypt_tensor(&keys, &mut data).unwrap();
    let err = decrypt_tensor(&DecryptionKeys::passphrase(b"pw".to_vec()), &info, &mut data).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Crypto);
}

fn min_params(salt: u8) -> PwHashParams {
    PwHashParams { opslimit: OPSLIMIT_MIN, memlimit: MEMLIMIT_MIN, alg: ALG_ARGON2ID13, salt: vec![salt; SALT_LEN] }
}

#[test]
fn passphrase_round_trip_stores_the_kdf_chunk_first() {
    let keys = EncryptionKeys::from_passphrase(b"hunter2", OPSLIMIT_MIN, MEMLIMIT_MIN, None).unwrap();
    let params = keys.kdf.clone().unwrap();
    assert_eq!(params.salt.len(), SALT_LEN);
    assert_eq!(keys.key, derive_key(b"hunter2", &params).unwrap());
    let plain = pattern(CHUNK_SIZE + 3);
    let mut data = plain.clone();
    let info = encrypt_tensor(&keys, &mut data).unwrap();
    assert_eq!(info.chunks[0], CryptChunk::Kdf(params.clone()));
    assert!(matches!(info.chunks[1], CryptChunk::XSalsa20Parallel { .. }));
    let mut d = data.clone();
    decrypt_tensor(&DecryptionKeys::passphrase(b"hunter2".to_vec()), &info, &mut d).unwrap();
    assert!(d == plain);
    // The raw derived key opens it too; a wrong passphrase does not.
    let mut d = data.clone();
    decrypt_tensor(&DecryptionKeys::Key(keys.key), &info, &mut d).unwrap();
    assert!(d == plain);
    let err = decrypt_tensor(&DecryptionKeys::passphrase(b"hunter3".to_vec()), &info, &mut data.clone()).unwrap_err();
    assert_eq!(err.message, AUTH_FAILED);
    // A fixed salt is used as given.
    let k2 = EncryptionKeys::from_passphrase(b"hunter2", OPSLIMIT_MIN, MEMLIMIT_MIN, Some([1; 16])).unwrap();
    assert_eq!(k2.kdf.as_ref().unwrap().salt, vec![1; 16]);
}

#[test]
fn kdf_parameters_are_validated() {
    let ok = min_params(0);
    derive_key(b"pw", &ok).unwrap();
    assert_eq!(derive_key(b"", &ok).unwrap_err().kind, ErrorKind::Value);
    for bad in [
        PwHashParams { alg: 1, ..ok.clone() },
        PwHashParams { salt: vec![0; 15], ..ok.clone() },
        PwHashParams { salt: vec![], ..ok.clone() },
        PwHashParams { opslimit: 0, ..ok.clone() },
        PwHashParams { opslimit: 1 << 32, ..ok.clone() },
        PwHashParams { memlimit: MEMLIMIT_MIN - 1, ..ok.clone() },
        PwHashParams { memlimit: MEMLIMIT_MAX + 1, ..ok.clone() },
    ] {
        assert_eq!(derive_key(b"pw", &bad).unwrap_err().kind, ErrorKind::Crypto, "{bad:?}");
        assert!(derive_key_cached(b"pw", &bad, &KdfLimits::default(), &|| false).is_err());
    }
    // memlimit is rounded down to whole KiB, as libsodium does.
    let a = derive_key(b"pw", &PwHashParams { memlimit: 8192, ..ok.clone() }).unwrap();
    let b = derive_key(b"pw", &PwHashParams { memlimit: 9215, ..ok.clone() }).unwrap();
    assert_eq!(a, b);
}

#[test]
fn derived_keys_are_cached_per_passphrase_and_params() {
    let p = min_params(0xab);
    let a = derive_key_cached(b"cache-test", &p, &KdfLimits::default(), &|| false).unwrap();
    let n = super::kdf::cache_len();
    assert!(n >= 1);
    let b = derive_key_cached(b"cache-test", &p, &KdfLimits::default(), &|| false).unwrap();
    assert_eq!(*a, *b);
    assert_eq!(*a, derive_key(b"cache-test", &p).unwrap());
    // A different passphrase or salt is a different entry with a different key.
    let c = derive_key_cached(b"cache-test2", &p, &KdfLimits::default(), &|| false).unwrap();
    assert_ne!(*a, *c);
    let d = derive_key_cached(b"cache-test", &min_params(0xac), &KdfLimits::default(), &|| false).unwrap();
    assert_ne!(*a, *d);
    // Concurrent callers agree.
    let keys: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| *derive_key_cached(b"cache-test3", &p, &KdfLimits::default(), &|| false).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn debug_never_shows_secrets() {
    let k = DecryptionKeys::Key([0xAB; 32]);
    let p = DecryptionKeys::passphrase(b"supersecret".to_vec());
    let e = EncryptionKeys::from_key([0xAB; 32]);
    for s in [format!("{k:?}"), format!("{p:?}"), format!("{e:?}"), format!("{:?}", Encryptor::new(e.clone()))] {
        assert!(s.contains("redacted"), "{s}");
        assert!(!s.contains("171") && !s.to_lowercase().contains("ab, ") && !s.contains("supersecret"), "{s}");
    }
}

#[test]
fn random_helpers_differ() {
    assert_ne!(random_key().unwrap(), random_key().unwrap());
    assert_ne!(random_salt().unwrap(), random_salt().unwrap());
    assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
    assert_ne!(EncryptionKeys::random().unwrap().key, [0u8; 32]);
}

#[test]
fn kdf_limits_bound_what_a_file_may_ask_for() {
    use super::kdf::{MEMLIMIT_MODERATE, MEMLIMIT_SENSITIVE, OPSLIMIT_SENSITIVE};
    let d = KdfLimits::default();
    let p = |opslimit: u64, memlimit: u64| PwHashParams { opslimit, memlimit, ..min_params(0) };
    // Every preset combination, and more passes over less memory.
    for ops in 1..=OPSLIMIT_SENSITIVE {
        for mem in [MEMLIMIT_MIN, 64 << 20, MEMLIMIT_MODERATE, MEMLIMIT_SENSITIVE] {
            d.check(&p(ops, mem)).unwrap();
        }
    }
    d.check(&p(16, MEMLIMIT_MODERATE)).unwrap();
    // The fuzzing campaign's values: 2^32 - 1, and 1 with bit 24 flipped.
    for ops in [u32::MAX as u64, 16_777_217, OPSLIMIT_SENSITIVE + 1] {
        let e = d.check(&p(ops, MEMLIMIT_SENSITIVE)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Crypto);
        assert!(e.message.contains(&format!("opslimit {ops} is above the bound")), "{}", e.message);
        assert!(e.message.contains("max_opslimit"), "{}", e.message);
    }
    let e = d.check(&p(1, MEMLIMIT_SENSITIVE + 1024)).unwrap_err();
    assert!(e.message.contains("memlimit 1073742848 bytes is above the bound"), "{}", e.message);
    // Raised explicitly, they pass; the cached derivation checks before it starts.
    KdfLimits::new(Some(5), None).check(&p(5, MEMLIMIT_SENSITIVE)).unwrap();
    KdfLimits::new(None, Some(2 << 30)).check(&p(1, 2 << 30)).unwrap();
    let t0 = std::time::Instant::now();
    assert!(derive_key_cached(b"pw", &p(u32::MAX as u64, MEMLIMIT_SENSITIVE), &d, &|| false).is_err());
    assert!(t0.elapsed() < std::time::Duration::from_secs(1));
}

#[test]
fn a_waiting_derivation_gives_up_when_told_and_finishes_unobserved() {
    let params = PwHashParams { opslimit: 8, memlimit: 128 << 20, ..min_params(0x5a) };
    let t0 = std::time::Instant::now();
    let stop = || t0.elapsed() > std::time::Duration::from_millis(100);
    let err = derive_key_cached(b"interrupt-me", &params, &KdfLimits::default(), &stop).unwrap_err();
    assert!(err.message.contains("stopped"), "{}", err.message);
    assert!(t0.elapsed() < std::time::Duration::from_millis(600), "{:?}", t0.elapsed());
    // The derivation went on and is cached for the next caller.
    let key = derive_key_cached(b"interrupt-me", &params, &KdfLimits::default(), &|| false).unwrap();
    assert_eq!(*key, derive_key(b"interrupt-me", &params).unwrap());
}

#[test]
fn one_passphrase_load_derives_for_one_setting_only() {
    // Tensors whose KDF chunks differ (a hostile file: CoreWeave's writer stores one setting)
    // are refused before a second derivation; clones of the keys share what the first saw.
    let keys = DecryptionKeys::passphrase(b"one-setting".to_vec());
    let info = |salt| CryptInfo { chunks: vec![CryptChunk::Kdf(min_params(salt))] };
    let first = keys.key_for(&info(0x51)).unwrap();
    assert_eq!(*keys.clone().key_for(&info(0x51)).unwrap(), *first);
    let err = keys.clone().key_for(&info(0x52)).unwrap_err();
    assert!(err.message.contains("key-derivation settings"), "{err}");
    // A fresh load (new keys) of that other setting derives as usual.
    DecryptionKeys::passphrase(b"one-setting".to_vec()).key_for(&info(0x52)).unwrap();
}
