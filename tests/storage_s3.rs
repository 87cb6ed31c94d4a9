//! S3 sources and sinks against moto's S3 server on 127.0.0.1 (tests/servers/moto_s3.py), with
//! SigV4 authentication on. Needs `python3` with `moto[server]`.
mod common;

use std::sync::Arc;

use common::{pattern, Moto};
use tensorizer_rs::error::ErrorKind;
use tensorizer_rs::storage::{create_sink, open_source, read_all, write_all, Source, Stop, StorageOptions};

const MIB: usize = 1 << 20;

fn tuned(moto: &Moto) -> StorageOptions {
    StorageOptions {
        request_size: Some(MIB),
        max_concurrency: Some(16),
        s3_part_size: Some(5 * MIB),
        max_retries: Some(2),
        ..moto.options()
    }
}

/// Wait (up to 20 s) until the server has logged a matching request.
fn wait_for_log(moto: &Moto, pred: impl Fn(&str) -> bool) {
    for _ in 0..400 {
        if moto.log().lines().any(&pred) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("request never logged:\n{}", moto.log());
}

fn uploads_in_progress(moto: &Moto, bucket: &str) -> usize {
    let (rt, client) = moto.sdk();
    let out = rt.block_on(client.list_multipart_uploads().bucket(bucket).send()).unwrap();
    out.uploads().len()
}

#[test]
fn multipart_write_then_parallel_ranged_reads() {
    let Some(moto) = Moto::start(true) else { return };
    moto.create_bucket("models");
    let opts = tuned(&moto);
    let data = pattern(64 * MIB + 4321, 11);

    // Write as the serializer does: a reserved header, data from two threads in roughly
    // ascending order, then the header rewritten last.
    let sink = create_sink("s3://models/llm/model.tensors", &opts).unwrap();
    sink.set_header_len(4096).unwrap();
    sink.write_at(0, &vec![0u8; 4096]).unwrap();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (sink, data) = (&sink, &data);
            s.spawn(move || {
                for (i, chunk) in data[4096..].chunks(3 * MIB + 17).enumerate() {
                    if i % 2 == t {
                        sink.write_at(4096 + (i * (3 * MIB + 17)) as u64, chunk).unwrap();
                    }
                }
            });
        }
    });
    sink.write_at(0, &data[..4096]).unwrap();
    if let Err(e) = sink.finish() {
        panic!("{e}\nserver log:\n{}", moto.log());
    }

    let log = moto.log();
    assert!(log.contains("POST /models/llm/model.tensors?uploads"), "CreateMultipartUpload missing:\n{log}");
    let parts =
        log.lines().filter(|l| l.contains("PUT /models/llm/model.tensors?") && l.contains("partNumber=")).count();
    assert_eq!(parts, 13, "part 1 (5 MiB) and 12 more for 64 MiB:\n{log}");
    let complete = log.lines().any(|l| l.contains("POST /models/llm/model.tensors?") && l.contains("uploadId="));
    assert!(complete, "CompleteMultipartUpload missing");
    assert_eq!(uploads_in_progress(&moto, "models"), 0);

    let source: Arc<dyn Source> = open_source("s3://models/llm/model.tensors", &opts).unwrap().into();
    assert_eq!(source.size(), data.len() as u64);
    assert_eq!(source.describe(), "s3://models/llm/model.tensors");
    let mut all = vec![0u8; data.len()];
    source.read_at(0, &mut all).unwrap();
    assert!(all == data, "read-back differs");
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (source, data) = (Arc::clone(&source), &data);
            s.spawn(move || {
                for i in 0..4u64 {
                    let offset = (t * 9_999_991 + i * 5_000_011) % (data.len() as u64 - 4 * MIB as u64);
                    let len = 1 + ((t + 3) * (i + 5) * 77_777) as usize % (3 * MIB);
                    let mut buf = vec![0u8; len];
                    source.read_at(offset, &mut buf).unwrap();
                    assert!(buf[..] == data[offset as usize..offset as usize + len]);
                }
            });
        }
    });
    let ranged = moto.log().lines().filter(|l| l.contains("GET /models/llm/model.tensors")).count();
    assert!(ranged >= 64, "expected >= 64 ranged GETs, saw {ranged}");

    // A streamed range (what the GPU readers use) is one GET, whatever its length.
    let mut got = Vec::with_capacity(20 * MIB);
    source
        .read_stream(
            3 * MIB as u64 + 5,
            20 * MIB,
            &mut |b: &[u8]| {
                got.extend_from_slice(b);
                Ok(())
            },
            Stop::never(),
        )
        .unwrap();
    assert!(got[..] == data[3 * MIB + 5..23 * MIB + 5], "streamed range differs");
    let gets = || moto.log().lines().filter(|l| l.contains("GET /models/llm/model.tensors")).count();
    for _ in 0..100 {
        if gets() > ranged {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50)); // the server logs after replying
    }
    assert_eq!(gets(), ranged + 1, "one GET for a streamed 20 MiB range");
}

#[test]
fn writers_wait_for_memory_and_out_of_order_writes_round_trip() {
    let Some(moto) = Moto::start(true) else { return };
    moto.create_bucket("bounded");
    // Room for two 5 MiB parts: writers must wait for uploads to free memory.
    let opts = StorageOptions { s3_upload_buffer: Some(10 * MIB), ..tuned(&moto) };
    let data = pattern(40 * MIB + 99, 15);
    let sink = create_sink("s3://bounded/m", &opts).unwrap();
    // Four writers, each taking every fourth 1 MiB block, in descending order within a part.
    std::thread::scope(|s| {
        for t in 0..4 {
            let (sink, data) = (&sink, &data);
            s.spawn(move || {
                let blocks: Vec<usize> = (0..data.len().div_ceil(MIB)).filter(|i| i % 4 == t).collect();
                for group in blocks.chunks(2) {
                    for &i in group.iter().rev() {
                        let end = ((i + 1) * MIB).min(data.len());
                        sink.write_at((i * MIB) as u64, &data[i * MIB..end]).unwrap();
                    }
                }
            });
        }
    });
    sink.finish().unwrap();
    assert!(read_all("s3://bounded/m", &opts).unwrap() == data, "read-back differs");
}

#[test]
fn small_objects_are_one_put_and_side_files_round_trip() {
    let Some(moto) = Moto::start(true) else { return };
    moto.create_bucket("side");
    let opts = tuned(&moto);
    write_all("s3://side/dir/config.json", &opts, b"{\"a\": 1}").unwrap();
    assert_eq!(read_all("s3://side/dir/config.json", &opts).unwrap(), b"{\"a\": 1}");
    write_all("s3://side/empty", &opts, b"").unwrap();
    assert!(read_all("s3://side/empty", &opts).unwrap().is_empty());
    assert!(!moto.log().contains("?uploads"), "no multipart upload for small objects");
}

#[test]
fn failed_or_abandoned_uploads_leave_nothing() {
    let Some(moto) = Moto::start(true) else { return };
    moto.create_bucket("tmp");
    let opts = tuned(&moto);
    let data = pattern(20 * MIB, 12);

    // Dropped without finish after parts went up.
    let sink = create_sink("s3://tmp/dropped", &opts).unwrap();
    sink.write_at(0, &data).unwrap();
    wait_for_log(&moto, |l| l.contains("PUT /tmp/dropped?") && l.contains("partNumber=4"));
    drop(sink);
    let part2 = moto.log().lines().any(|l| l.contains("PUT /tmp/dropped?") && l.contains("partNumber=2"));
    assert!(part2, "a part was uploaded before the drop");
    assert_eq!(open_source("s3://tmp/dropped", &opts).err().unwrap().kind, ErrorKind::NotFound);
    assert_eq!(uploads_in_progress(&moto, "tmp"), 0);

    // A write the sink cannot honour (bytes already uploaded) fails, and so does finish.
    let sink = create_sink("s3://tmp/failed", &opts).unwrap();
    sink.write_at(0, &data).unwrap();
    let err = sink.write_at(6 * MIB as u64, b"late").unwrap_err();
    assert_eq!(err.kind, ErrorKind::Unsupported, "{err}");
    drop(sink);
    assert_eq!(open_source("s3://tmp/failed", &opts).err().unwrap().kind, ErrorKind::NotFound);

    // Uploads that fail on the server (no such bucket): finish reports it, nothing remains.
    let sink = create_sink("s3://no-such-bucket/x", &opts).unwrap();
    let result = sink.write_at(0, &data).and_then(|()| sink.finish());
    let err = result.unwrap_err();
    assert!(err.to_string().contains("s3://no-such-bucket/x"), "{err}");
    assert_eq!(uploads_in_progress(&moto, "tmp"), 0);
    let aborted = moto.log().lines().any(|l| l.contains("DELETE /tmp/dropped?") && l.contains("uploadId="));
    assert!(aborted, "AbortMultipartUpload was sent");
}

#[test]
fn wrong_credentials_missing_objects_and_replaced_objects() {
    let Some(moto) = Moto::start(true) else { return };
    moto.create_bucket("guarded");
    let opts = tuned(&moto);
    write_all("s3://guarded/m.tensors", &opts, &pattern(3 * MIB, 13)).unwrap();

    let wrong = StorageOptions { s3_secret_access_key: Some("not-the-secret".into()), ..opts.clone() };
    let err = open_source("s3://guarded/m.tensors", &wrong).err().unwrap();
    let shown = err.to_string();
    assert_eq!(err.kind, ErrorKind::Io);
    assert!(shown.contains("access denied") && shown.contains("s3://guarded/m.tensors"), "{shown}");
    assert!(!shown.contains("not-the-secret") && !shown.contains(&moto.secret_key), "{shown}");
    let unknown = StorageOptions { s3_access_key_id: Some("AKIAUNKNOWN0000000".into()), ..wrong };
    let err = write_all("s3://guarded/new", &unknown, b"x").unwrap_err();
    assert!(err.to_string().contains("access denied"), "{err}");

    let err = open_source("s3://guarded/absent.tensors", &opts).err().unwrap();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("s3://guarded/absent.tensors"), "{err}");
    let err = open_source("s3://no-such-bucket/m.tensors", &opts).err().unwrap();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");

    let source = open_source("s3://guarded/m.tensors", &opts).unwrap();
    write_all("s3://guarded/m.tensors", &opts, &pattern(3 * MIB, 14)).unwrap();
    let mut buf = vec![0u8; MIB];
    let err = source.read_at(2 * MIB as u64, &mut buf).unwrap_err();
    assert!(err.to_string().contains("changed while it was being read"), "{err}");
}

#[test]
fn anonymous_access_and_s3cfg_credentials() {
    // A server without auth stands in for a public bucket.
    let Some(public) = Moto::start(false) else { return };
    public.create_bucket("public");
    let anon = StorageOptions {
        s3_access_key_id: Some(String::new()),
        s3_secret_access_key: Some(String::new()),
        s3_endpoint: Some(public.endpoint()),
        ..Default::default()
    };
    let (rt, client) = public.sdk();
    let put = client
        .put_object()
        .bucket("public")
        .key("open.bin")
        .acl(aws_sdk_s3::types::ObjectCannedAcl::PublicRead)
        .body(b"anyone".to_vec().into());
    rt.block_on(put.send()).unwrap();
    assert_eq!(read_all("s3://public/open.bin", &anon).unwrap(), b"anyone");

    // Keys, endpoint and http from an s3cmd config file.
    let Some(moto) = Moto::start(true) else { return };
    moto.create_bucket("cfg");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("s3cfg");
    std::fs::write(
        &cfg,
        format!(
            "[default]\naccess_key = {}\nsecret_key = {}\nhost_base = 127.0.0.1:{}\nuse_https = False\n",
            moto.access_key, moto.secret_key, moto.port
        ),
    )
    .unwrap();
    let from_cfg =
        StorageOptions { s3_config_path: Some(cfg), s3_region: Some("us-east-1".into()), ..Default::default() };
    write_all("s3://cfg/k", &from_cfg, b"configured").unwrap();
    assert_eq!(read_all("s3://cfg/k", &moto.options()).unwrap(), b"configured");
}
