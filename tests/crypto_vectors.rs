//! Decrypt every encrypted golden vector (written by CoreWeave's tensorizer with libsodium)
//! through the format layer and `crypto::decrypt_tensor`, and compare with the manifests.
//! The vectors: `tests/vectors` (in the repository), or `TENSORIZER_VECTORS`.
use std::path::PathBuf;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tensorizer_rs::crypto::{self, DecryptionKeys, AUTH_FAILED};
use tensorizer_rs::error::ErrorKind;
use tensorizer_rs::format::crypt_info::PwHashParams;
use tensorizer_rs::format::header::HEADER_LEN;
use tensorizer_rs::format::index::parse_index;
use tensorizer_rs::format::record::HASH_SHA256;
use tensorizer_rs::format::{FileHeader, TensorHeader};

fn vectors_dir() -> PathBuf {
    match std::env::var_os("TENSORIZER_VECTORS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0);
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key32(b: &[u8]) -> [u8; 32] {
    b.try_into().expect("32-byte key")
}

fn manifest(name: &str) -> Value {
    let p = vectors_dir().join(format!("{name}.tensors.json"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Per tensor: (name, result of decrypting its data).
fn decrypt_file(name: &str, keys: &DecryptionKeys) -> Vec<(String, Result<(), tensorizer_rs::error::Error>)> {
    let m = manifest(name);
    let buf = std::fs::read(vectors_dir().join(format!("{name}.tensors"))).unwrap();
    let header = FileHeader::parse(&buf).unwrap();
    assert!(header.has_crypt_info(), "{name}: not an encrypted file");
    let index_end = HEADER_LEN + header.index_len as usize;
    let entries = parse_index(&buf[HEADER_LEN..index_end], header.tensor_count, header.versioned_entries()).unwrap();
    let tensors = m["tensors"].as_array().unwrap();
    assert_eq!(entries.len(), tensors.len());
    let mut out = Vec::new();
    for (entry, t) in entries.iter().zip(tensors) {
        let tname = entry.name_lossy();
        assert_eq!(to_hex(&entry.name), t["name_bytes_hex"].as_str().unwrap());
        let (h_off, d_off, d_len) =
            (entry.header_offset as usize, entry.data_offset as usize, entry.data_length as usize);
        assert_eq!(d_off as u64, t["data_offset"].as_u64().unwrap());
        assert_eq!(d_len as u64, t["data_length"].as_u64().unwrap());
        let hbuf = &buf[h_off..d_off];
        let th = TensorHeader::parse(hbuf, entry.wide_shape(), header.has_crypt_info()).unwrap();
        assert_eq!(th.data_length as usize, d_len);
        let info = th.crypt.clone().expect("every header of an encrypted file has a crypt-info block");
        let is_meta = t["is_meta"].as_bool().unwrap();
        if is_meta {
            assert!(info.chunks.is_empty(), "{tname}: meta tensor with cipher chunks");
        } else {
            assert!(info.cipher().unwrap().is_some(), "{tname}: not encrypted");
        }
        let mut data = buf[d_off..d_off + d_len].to_vec();
        let r = crypto::decrypt_tensor(keys, &info, &mut data);
        if r.is_ok() && !is_meta {
            assert_eq!(to_hex(&Sha256::digest(&data)), t["sha256"].as_str().unwrap(), "{name}: tensor {tname}");
            // The stored SHA256 covers the hashable header and the plaintext (spec §8).
            let stored = th.hashes.iter().find(|h| h.kind == HASH_SHA256).expect("a SHA256");
            let mut h = Sha256::new();
            h.update(th.hashable(hbuf));
            h.update(&data);
            assert_eq!(h.finalize().as_slice(), &stored.value[..], "{name}: tensor {tname}: stored hash");
        }
        out.push((tname, r));
    }
    out
}

fn assert_all_ok(results: &[(String, Result<(), tensorizer_rs::error::Error>)]) {
    for (n, r) in results {
        if let Err(e) = r {
            panic!("tensor {n}: {e}");
        }
    }
}

fn raw_key(name: &str, key_file: &str) -> DecryptionKeys {
    let m = manifest(name);
    let k = std::fs::read(vectors_dir().join(key_file)).unwrap();
    assert_eq!(to_hex(&k), m["encryption"]["key_hex"].as_str().unwrap());
    DecryptionKeys::Key(key32(&k))
}

fn pw_params(m: &Value) -> (Vec<u8>, PwHashParams, [u8; 32]) {
    let e = &m["encryption"];
    assert_eq!(e["kind"], "passphrase");
    let params = PwHashParams {
        opslimit: e["opslimit"].as_u64().unwrap(),
        memlimit: e["memlimit"].as_u64().unwrap(),
        alg: e["alg"].as_i64().unwrap() as i32,
        salt: hex(e["salt_hex"].as_str().unwrap()),
    };
    let pass = e["passphrase"].as_str().unwrap().as_bytes().to_vec();
    (pass, params, key32(&hex(e["derived_key_hex"].as_str().unwrap())))
}

#[test]
fn enc_random_v3_decrypts() {
    let r = decrypt_file("enc_random_v3", &raw_key("enc_random_v3", "enc_random_v3.key"));
    assert_eq!(r.len(), 6);
    assert_all_ok(&r);
}

#[test]
fn enc_vllm_chunked_decrypts_three_chunks() {
    let r = decrypt_file("enc_vllm_chunked", &raw_key("enc_vllm_chunked", "enc_vllm_chunked.key"));
    assert_eq!(r.len(), 11);
    assert_all_ok(&r);
    // big.weight really is 3 chunks with 3 MACs.
    let buf = std::fs::read(vectors_dir().join("enc_vllm_chunked.tensors")).unwrap();
    let m = manifest("enc_vllm_chunked");
    let t = m["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "big.weight").unwrap();
    let (h, d) = (t["header_offset"].as_u64().unwrap() as usize, t["data_offset"].as_u64().unwrap() as usize);
    let th = TensorHeader::parse(&buf[h..d], false, true).unwrap();
    let info = th.crypt.unwrap();
    match info.cipher().unwrap().unwrap() {
        tensorizer_rs::format::crypt_info::CryptChunk::XSalsa20Parallel { chunk_size, macs, .. } => {
            assert_eq!(*chunk_size, crypto::CHUNK_SIZE as u64);
            assert_eq!(macs.len(), 3);
        }
        other => panic!("{other:?}"),
    }
    let plan = crypto::DecryptPlan::new(&raw_key("enc_vllm_chunked", "enc_vllm_chunked.key"), &info, 5_280_000)
        .unwrap()
        .unwrap();
    let lens: Vec<usize> = plan.pieces().iter().map(|p| p.range.len()).collect();
    assert_eq!(lens, vec![2_097_152, 2_097_152, 1_085_696]);
}

#[test]
fn enc_tampered_fails_on_enc_f32_only() {
    let r = decrypt_file("enc_tampered", &raw_key("enc_random_v3", "enc_random_v3.key"));
    for (n, res) in &r {
        if n == "enc_f32" {
            let e = res.as_ref().unwrap_err();
            assert_eq!(e.kind, ErrorKind::Crypto);
            assert_eq!(e.message, AUTH_FAILED);
        } else {
            assert!(res.is_ok(), "{n}: {res:?}");
        }
    }
    assert!(r.iter().any(|(n, _)| n == "enc_f32"));
}

#[test]
fn wrong_key_fails_every_encrypted_tensor() {
    let r = decrypt_file("enc_random_v3", &raw_key("enc_vllm_chunked", "enc_vllm_chunked.key"));
    assert!(r.iter().all(|(_, res)| res.as_ref().is_err_and(|e| e.message == AUTH_FAILED)));
}

#[test]
fn tz2101_passphrase_derives_and_decrypts() {
    let m = manifest("tz2101_enc_passphrase");
    let (pass, params, derived) = pw_params(&m);
    assert_eq!((params.opslimit, params.memlimit), (1, 8192));
    assert_eq!(crypto::derive_key(&pass, &params).unwrap(), derived);
    assert_all_ok(&decrypt_file("tz2101_enc_passphrase", &DecryptionKeys::passphrase(pass)));
    assert_all_ok(&decrypt_file("tz2101_enc_passphrase", &DecryptionKeys::Key(derived)));
    // A passphrase file with a wrong passphrase fails authentication.
    let r = decrypt_file("tz2101_enc_passphrase", &DecryptionKeys::passphrase(b"nope".to_vec()));
    assert!(r.iter().all(|(_, res)| res.as_ref().is_err_and(|e| e.message == AUTH_FAILED)));
}

#[test]
fn enc_passphrase_v4_derives_and_decrypts() {
    let m = manifest("enc_passphrase_v4");
    let (pass, params, derived) = pw_params(&m);
    assert_eq!((params.opslimit, params.memlimit), (3, 256 << 20));
    // Argon2id, 3 passes over 256 MiB: derived once here, then served from the cache for all
    // tensors of the file.
    let cached = crypto::derive_key_cached(&pass, &params, &Default::default(), &|| false).unwrap();
    assert_eq!(*cached, derived);
    let r = decrypt_file("enc_passphrase_v4", &DecryptionKeys::passphrase(pass));
    assert_eq!(r.len(), 4);
    assert_all_ok(&r);
    assert_all_ok(&decrypt_file("enc_passphrase_v4", &DecryptionKeys::Key(derived)));
}

#[test]
fn passphrase_against_raw_key_file_is_a_crypto_error() {
    let r = decrypt_file("enc_random_v3", &DecryptionKeys::passphrase(b"pw".to_vec()));
    for (n, res) in &r {
        let e = res.as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Crypto, "{n}");
    }
}
