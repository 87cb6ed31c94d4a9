//! The load pipeline into host memory, without Python: files written by our writer (plain and
//! encrypted, with meta, empty, tiny and multi-piece tensors) come back byte for byte with any
//! number of readers, with and without hash verification; a flipped byte fails the load with
//! the tensor's name, as does a wrong key.
use tensorizer_rs::crypto::{DecryptionKeys, EncryptionKeys};
use tensorizer_rs::error::ErrorKind;
use tensorizer_rs::load::{load_to_host, LoadOptions, TensorFile};
use tensorizer_rs::storage::{create_sink, open_source, StorageOptions};
use tensorizer_rs::write::{NewEntry, Writer};

/// (name, bytes; None: a meta tensor of 4096 zero bytes)
fn tensors() -> Vec<(String, Option<Vec<u8>>)> {
    let bytes = |n: usize, seed: u32| (0..n as u32).map(|i| (i.wrapping_mul(2654435761) ^ seed) as u8).collect();
    let mut out = vec![("meta".to_string(), None), ("empty".to_string(), Some(Vec::new()))];
    for k in 0..40 {
        out.push((format!("small{k}"), Some(bytes(64 + k * 37, k as u32))));
    }
    // Larger than a host piece (32 MiB): two pieces, the last one short.
    out.push(("big".to_string(), Some(bytes((32 << 20) + 4099, 7))));
    out.push(("mid".to_string(), Some(bytes((3 << 20) + 1, 8))));
    out
}

fn write(path: &str, keys: Option<EncryptionKeys>) {
    let mut w = Writer::new(create_sink(path, &StorageOptions::default()).unwrap(), keys);
    let ts = tensors();
    let entries = ts
        .iter()
        .map(|(name, data)| NewEntry {
            module_idx: 3,
            tensor_type: 2,
            name: name.as_bytes().to_vec(),
            dtype: b"|u1".to_vec(),
            shape: vec![data.as_ref().map_or(4096, |d| d.len() as u64)],
            meta: data.is_none(),
        })
        .collect();
    let first = w.add(entries).unwrap();
    for (i, (_, data)) in ts.iter().enumerate() {
        w.write(first + i, data.as_deref().unwrap_or(&[])).unwrap();
    }
    w.finish().unwrap();
}

fn open(path: &str) -> TensorFile {
    TensorFile::open(open_source(path, &StorageOptions::default()).unwrap()).unwrap()
}

fn check_all(path: &str, keys: Option<DecryptionKeys>) {
    let f = open(path);
    let ts = tensors();
    // Any order, a subset too.
    let which: Vec<usize> = (0..f.entries.len()).rev().collect();
    for readers in [1, 16] {
        for verify_hash in [false, true] {
            let opts = LoadOptions { num_readers: Some(readers), verify_hash, keys: keys.clone(), io: None };
            let loaded = load_to_host(&f, &which, &opts, None).unwrap();
            assert_eq!(loaded.len(), which.len());
            for (t, &i) in loaded.iter().zip(&which) {
                assert_eq!(t.entry, i);
                assert_eq!(t.module_idx, 3);
                let (name, data) = &ts[i];
                let want = data.clone().unwrap_or_else(|| vec![0u8; 4096]);
                assert!(t.data.as_slice() == want, "{name}: {readers} readers, verify {verify_hash}");
            }
        }
    }
    let part = load_to_host(&f, &[3, 42], &LoadOptions { keys, ..Default::default() }, None).unwrap();
    assert_eq!(part[1].data.len(), (32 << 20) + 4099);
}

#[test]
fn plain_and_encrypted_files_load_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.tensors");
    write(plain.to_str().unwrap(), None);
    check_all(plain.to_str().unwrap(), None);
    let enc = dir.path().join("enc.tensors");
    let key = [9u8; 32];
    write(enc.to_str().unwrap(), Some(EncryptionKeys::from_key(key)));
    check_all(enc.to_str().unwrap(), Some(DecryptionKeys::Key(key)));
}

#[test]
fn corruption_and_wrong_keys_fail_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.tensors");
    let path = path.to_str().unwrap();
    write(path, None);
    let f = open(path);
    let big = f.entries.iter().find(|e| e.name == b"big").unwrap().clone();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[(big.data_offset + big.data_length - 10) as usize] ^= 1;
    let bad = dir.path().join("bad.tensors");
    std::fs::write(&bad, &bytes).unwrap();
    let f = open(bad.to_str().unwrap());
    let all: Vec<usize> = (0..f.entries.len()).collect();
    // Unchecked, the flipped byte goes through; checked, the load fails, naming the tensor.
    load_to_host(&f, &all, &LoadOptions::default(), None).unwrap();
    let e = load_to_host(&f, &all, &LoadOptions { verify_hash: true, ..Default::default() }, None).err().unwrap();
    assert_eq!(e.kind, ErrorKind::HashMismatch, "{e}");
    assert!(e.to_string().contains("'big'") && e.to_string().contains("bad.tensors"), "{e}");

    let enc = dir.path().join("enc.tensors");
    write(enc.to_str().unwrap(), Some(EncryptionKeys::from_key([1; 32])));
    let f = open(enc.to_str().unwrap());
    let wrong = LoadOptions { keys: Some(DecryptionKeys::Key([2; 32])), ..Default::default() };
    let e = load_to_host(&f, &all, &wrong, None).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Crypto, "{e}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
    let e = load_to_host(&f, &all, &LoadOptions::default(), None).err().unwrap();
    assert_eq!(e.kind, ErrorKind::Crypto, "{e}");
}
