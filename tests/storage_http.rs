//! HTTP(S) sources against real servers on 127.0.0.1: nginx (parallel ranges, redirects,
//! replaced objects) and tests/servers/http_server.py (HTTP/1.0, no Range, injected faults).
//! Needs `nginx` and `python3` on PATH.
mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::{pattern, Nginx, PyHttp};
use tensorizer_rs::error::ErrorKind;
use tensorizer_rs::storage::{http_direct_bytes, open_source, read_all, Source, Stop, StorageOptions, StreamDest};

fn opts() -> StorageOptions {
    StorageOptions { request_size: Some(1 << 20), max_concurrency: Some(16), ..Default::default() }
}

fn fast_retries(n: u32) -> StorageOptions {
    StorageOptions { max_retries: Some(n), ..opts() }
}

#[test]
fn nginx_parallel_ranged_reads_return_exact_bytes() {
    let Some(nginx) = Nginx::start() else { return };
    let data = pattern((64 << 20) + 12345, 1);
    std::fs::write(nginx.root().join("model.tensors"), &data).unwrap();

    let source: Arc<dyn Source> = open_source(&nginx.url("model.tensors"), &opts()).unwrap().into();
    assert_eq!(source.size(), data.len() as u64);
    assert_eq!(source.describe(), nginx.url("model.tensors"));

    // One big read: split into 1 MiB requests, 16 in flight.
    let mut all = vec![0u8; data.len()];
    source.read_at(0, &mut all).unwrap();
    assert!(all == data, "whole-object read differs");

    // Several threads reading scattered ranges at once, as the load pipeline does.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let source = Arc::clone(&source);
            let data = &data;
            s.spawn(move || {
                for i in 0..8u64 {
                    let offset = (t * 7_919_993 + i * 3_141_593) % (data.len() as u64 - 3_000_000);
                    let len = 1 + ((t + 1) * (i + 1) * 65_537) as usize % 2_900_000;
                    let mut buf = vec![0u8; len];
                    source.read_at(offset, &mut buf).unwrap();
                    assert!(buf[..] == data[offset as usize..offset as usize + len], "range {offset}+{len} differs");
                }
            });
        }
    });
    // Past the end is an error, not a short read.
    let mut buf = vec![0u8; 10];
    assert_eq!(source.read_at(data.len() as u64 - 5, &mut buf).unwrap_err().kind, ErrorKind::Format);

    let log = nginx.access_log();
    let ranged: Vec<&str> = log.lines().filter(|l| l.contains("\"bytes=")).collect();
    assert!(ranged.len() >= 64, "expected >= 64 ranged GETs, saw {}", ranged.len());
    assert!(ranged.iter().all(|l| l.split(' ').nth(3) == Some("206")), "every ranged GET was served as 206");
    // The client opens a new connection only when every pooled one is busy: many connections
    // means many requests were in flight at once.
    let connections: HashSet<&str> = ranged.iter().filter_map(|l| l.split(' ').nth(5)).collect();
    assert!(connections.len() >= 8, "expected >= 8 concurrent connections, saw {}", connections.len());
}

#[test]
fn nginx_redirects_are_followed_and_missing_is_not_found() {
    let Some(nginx) = Nginx::start() else { return };
    let data = pattern(3 << 20, 2);
    std::fs::write(nginx.root().join("a.tensors"), &data).unwrap();
    let got = read_all(&nginx.url("moved/a.tensors"), &opts()).unwrap();
    assert!(got == data);
    assert!(nginx.access_log().lines().any(|l| l.starts_with("GET /moved/a.tensors") && l.contains(" 302 ")));

    let err = open_source(&nginx.url("nope.tensors"), &opts()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("nope.tensors"), "{err}");
}

#[test]
fn nginx_object_replaced_during_a_load_is_an_error() {
    let Some(nginx) = Nginx::start() else { return };
    let path = nginx.root().join("m.tensors");
    std::fs::write(&path, pattern(4 << 20, 3)).unwrap();
    let source = open_source(&nginx.url("m.tensors"), &opts()).unwrap();

    // Replace it (new mtime, so nginx's ETag changes even within the same second).
    let tmp = nginx.root().join("m.tensors.new");
    std::fs::write(&tmp, pattern(4 << 20, 4)).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(100);
    std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(later).unwrap();
    std::fs::rename(&tmp, &path).unwrap();

    let mut buf = vec![0u8; 2 << 20];
    let err = source.read_at(2 << 20, &mut buf).unwrap_err();
    assert!(err.to_string().contains("changed while it was being read"), "{err}");
}

/// A destination lending rooms of `room` bytes, as the GPU path lends staging buffers.
struct Rooms {
    got: Vec<u8>,
    room: usize,
    lent: usize,
}

impl StreamDest for Rooms {
    fn room(&mut self) -> tensorizer_rs::error::Result<&mut [u8]> {
        // A room lent and not written (the connection dropped) is lent again.
        self.got.truncate(self.got.len() - self.lent);
        let start = self.got.len();
        self.got.resize(start + self.room, 0);
        self.lent = self.room;
        Ok(&mut self.got[start..])
    }
    fn advance(&mut self, n: usize) -> tensorizer_rs::error::Result<()> {
        assert!(n > 0 && n <= self.lent, "advanced {n} of a {}-byte room", self.lent);
        let end = self.got.len() - self.lent + n;
        self.got.truncate(end);
        self.lent = 0;
        Ok(())
    }
}

/// Held by the tests that read the process-wide direct-bytes counter.
static DIRECT_COUNTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn stream_into(source: &dyn Source, offset: usize, len: usize, room: usize) -> tensorizer_rs::error::Result<Vec<u8>> {
    let mut dest = Rooms { got: Vec::new(), room, lent: 0 };
    source.read_stream_into(offset as u64, len, &mut dest, Stop::never())?;
    Ok(dest.got)
}

#[test]
fn plain_http_streams_from_the_socket_into_lent_buffers() {
    let Some(nginx) = Nginx::start() else { return };
    let _counter = DIRECT_COUNTER.lock().unwrap_or_else(|p| p.into_inner());
    let data = pattern((24 << 20) + 77, 9);
    std::fs::write(nginx.root().join("d.tensors"), &data).unwrap();
    let source = open_source(&nginx.url("d.tensors"), &opts()).unwrap();
    let before = http_direct_bytes();
    // Rooms smaller and larger than a socket read; one request per range, connections reused.
    for (offset, len, room) in [(3 << 20, 9 << 20, 8 << 20), (1 << 20, (23 << 20) + 77, 65_521), (5, 2 << 20, 1 << 20)]
    {
        let got = stream_into(&*source, offset, len, room).unwrap();
        assert!(got == data[offset..offset + len], "range {offset}+{len} differs");
    }
    let direct = http_direct_bytes() - before;
    assert!(direct >= (32 << 20) + 77 - (1 << 20), "bodies went through the direct path: {direct}");
    let log = nginx.access_log();
    let ranged = log.lines().filter(|l| l.starts_with("GET /d.tensors") && l.contains("\"bytes=")).count();
    assert_eq!(ranged, 1 + 3, "the probe, then one request per range");

    // Off: the same bytes through reqwest.
    let off = StorageOptions { http_direct: Some(false), ..opts() };
    let source = open_source(&nginx.url("d.tensors"), &off).unwrap();
    let before = http_direct_bytes();
    assert!(stream_into(&*source, 7, 10 << 20, 1 << 20).unwrap() == data[7..7 + (10 << 20)]);
    assert_eq!(http_direct_bytes(), before, "http_direct=false reads through reqwest");

    // The object replaced after open: the server refuses the old version (If-Match).
    let source = open_source(&nginx.url("d.tensors"), &opts()).unwrap();
    let path = nginx.root().join("d.tensors");
    let tmp = nginx.root().join("d.tensors.new");
    std::fs::write(&tmp, pattern(data.len(), 10)).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(100);
    std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(later).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let err = stream_into(&*source, 2 << 20, 4 << 20, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("changed while it was being read"), "{err}");
}

#[test]
fn small_direct_responses_do_not_wait_for_a_delayed_ack() {
    // nginx (sendfile, tcp_nopush, as distributions ship it) holds a response's last small
    // segment until the previous full one is acknowledged; a client that delays its ACK then
    // waits ~40 ms (Linux's shortest delayed ACK) for such a response: 64 KiB over loopback is
    // one full segment and a few bytes. Sending one takes well under a millisecond here, so
    // requests of 35 ms or more are counted: without the fix about half of them are.
    let Some(nginx) = Nginx::start() else { return };
    // Direct reads move the process-wide counter other tests check.
    let _counter = DIRECT_COUNTER.lock().unwrap_or_else(|p| p.into_inner());
    let data = pattern(4 << 20, 12);
    std::fs::write(nginx.root().join("q.tensors"), &data).unwrap();
    let source = open_source(&nginx.url("q.tensors"), &opts()).unwrap();
    let mut slow = Vec::new();
    for k in 0..24usize {
        let offset = (1 << 20) + k * 120_000; // past the probe's bytes
        let t = std::time::Instant::now();
        let got = stream_into(&*source, offset, 65_536, 1 << 20).unwrap();
        let took = t.elapsed();
        assert!(got == data[offset..offset + 65_536]);
        if took >= std::time::Duration::from_millis(35) {
            slow.push(took);
        }
    }
    assert!(slow.len() <= 3, "responses that waited on a delayed ACK: {slow:?}");
}

#[test]
fn direct_streams_resume_after_drops_and_retry_server_errors() {
    let Some(server) = PyHttp::start() else { return };
    let _counter = DIRECT_COUNTER.lock().unwrap_or_else(|p| p.into_inner());
    let data = pattern((5 << 20) + 3, 11);
    std::fs::write(server.dir.path().join("m"), &data).unwrap();
    let before = http_direct_bytes();
    // HTTP/1.0, connections cut mid-body twice: resumed where the bytes stopped.
    let source = open_source(&server.url("dropmid/2/m"), &fast_retries(5)).unwrap();
    let got = stream_into(&*source, 100, data.len() - 100, 1 << 20).unwrap();
    assert!(got == data[100..], "streamed bytes differ after drops");
    assert_eq!(server.count("dropmid/2/m"), 1 + 3, "the probe, then 2 cut-off requests and the rest");
    // 500s for the reads after the probe: retried, then the bytes.
    let source = open_source(&server.url("fail500mid/2/m"), &fast_retries(5)).unwrap();
    let got = stream_into(&*source, 2 << 20, 3 << 20, 1 << 20).unwrap();
    assert!(got == data[2 << 20..5 << 20]);
    assert_eq!(server.count("fail500mid/2/m"), 1 + 2 + 1, "the probe, two 500s, then the range");
    assert!(http_direct_bytes() - before >= (8 << 20) - 100, "read through the direct path");
    // Always failing: a clear error after the retries, never data.
    let source = open_source(&server.url("data/m"), &fast_retries(1)).unwrap();
    let gone = server.dir.path().join("m");
    std::fs::remove_file(&gone).unwrap();
    let err = stream_into(&*source, 2 << 20, 1 << 20, 1 << 20).unwrap_err();
    assert!(err.to_string().contains("not found") || err.to_string().contains("404"), "{err}");
}

#[test]
fn http10_server_with_and_without_range_support() {
    let Some(server) = PyHttp::start() else { return };
    let data = pattern((3 << 20) + 7, 5);
    std::fs::write(server.dir.path().join("m.tensors"), &data).unwrap();

    let source = open_source(&server.url("data/m.tensors"), &opts()).unwrap();
    let mut buf = vec![0u8; data.len() - 100];
    source.read_at(100, &mut buf).unwrap();
    assert!(buf[..] == data[100..]);
    assert!(source.caps().parallelism > 1);

    // A server that ignores Range: reads still return the right bytes, one stream at a time.
    let source = open_source(&server.url("norange/m.tensors"), &opts()).unwrap();
    assert_eq!(source.size(), data.len() as u64);
    assert_eq!(source.caps().parallelism, 1);
    let mut buf = vec![0u8; 1 << 20];
    source.read_at(2 << 20, &mut buf).unwrap();
    assert!(buf[..] == data[2 << 20..3 << 20]);

    // Redirects on HTTP/1.0, and an empty object.
    assert!(read_all(&server.url("redirect/m.tensors"), &opts()).unwrap() == data);
    std::fs::write(server.dir.path().join("empty"), b"").unwrap();
    assert!(read_all(&server.url("data/empty"), &opts()).unwrap().is_empty());
}

#[test]
fn transient_failures_are_retried_and_resumed() {
    let Some(server) = PyHttp::start() else { return };
    let data = pattern(3 << 20, 6);
    std::fs::write(server.dir.path().join("m"), &data).unwrap();

    // 500 twice, then success.
    assert!(read_all(&server.url("fail500/2/m"), &fast_retries(3)).unwrap() == data);
    assert_eq!(server.count("fail500/2/m"), 2 + 1 + 2, "2 failures, the open, then 2 MiB of ranges");

    // The connection drops mid-body on the first three requests; the rest of each range is refetched.
    let source = open_source(&server.url("drop/3/m"), &fast_retries(5)).unwrap();
    let mut buf = vec![0u8; data.len()];
    source.read_at(0, &mut buf).unwrap();
    assert!(buf == data, "bytes after a resumed range differ");
    assert_eq!(server.count("drop/3/m"), 3 + 1 + 2, "3 cut-off probes, the probe, then 2 MiB of ranges");

    // Always failing: a clear error after the retries, never data.
    let err = open_source(&server.url("always500/m"), &fast_retries(2)).err().unwrap();
    assert!(err.to_string().contains("gave up after 3 attempts"), "{err}");
    assert!(err.to_string().contains("500"), "{err}");
    assert_eq!(server.count("always500/m"), 3);
}

#[test]
fn read_stream_is_one_request_resumed_after_drops() {
    let Some(server) = PyHttp::start() else { return };
    let data = pattern((3 << 20) + 5, 8);
    std::fs::write(server.dir.path().join("m"), &data).unwrap();
    let stream = |path: &str, offset: usize| {
        let source = open_source(&server.url(path), &fast_retries(5)).unwrap();
        let mut got = Vec::new();
        let mut sink = |b: &[u8]| {
            got.extend_from_slice(b);
            Ok(())
        };
        source.read_stream(offset as u64, data.len() - offset, &mut sink, Stop::never()).unwrap();
        assert!(got == data[offset..], "streamed bytes of {path} differ");
    };
    // One request for the range, not one per 1 MiB; a range inside the probe's first MiB
    // needs none.
    stream("data/m", 100);
    assert_eq!(server.count("data/m"), 2, "the probe, then one request for the range");
    let source = open_source(&server.url("data/m"), &opts()).unwrap();
    let mut got = Vec::new();
    source
        .read_stream(
            10,
            1000,
            &mut |b: &[u8]| {
                got.extend_from_slice(b);
                Ok(())
            },
            Stop::never(),
        )
        .unwrap();
    assert!(got == data[10..1010]);
    assert_eq!(server.count("data/m"), 3, "only the second probe");
    // The stream's connection drops mid-body twice: it resumes where the bytes stopped.
    stream("dropmid/2/m", 100);
    assert_eq!(server.count("dropmid/2/m"), 1 + 3, "the probe, then 2 cut-off requests and the rest");

    // An error from the sink ends the read with that error, with no retry.
    let source = open_source(&server.url("data/m"), &opts()).unwrap();
    let mut sink = |_: &[u8]| Err(tensorizer_rs::error::Error::io("sink refused"));
    let err = source.read_stream(2 << 20, 1 << 20, &mut sink, Stop::never()).unwrap_err();
    assert!(err.to_string().contains("sink refused"), "{err}");
    assert_eq!(server.count("data/m"), 3 + 2, "a third probe and one request");
}

#[test]
fn headers_are_sent_and_refusals_are_clear() {
    let Some(server) = PyHttp::start() else { return };
    std::fs::write(server.dir.path().join("m"), b"secret bytes").unwrap();
    let err = open_source(&server.url("auth/m"), &opts()).err().unwrap();
    assert_eq!(err.kind, ErrorKind::Io);
    assert!(err.to_string().contains("access denied"), "{err}");

    let with_token =
        StorageOptions { http_headers: vec![("Authorization".into(), "Bearer let-me-in".into())], ..opts() };
    assert_eq!(read_all(&server.url("auth/m"), &with_token).unwrap(), b"secret bytes");
    assert!(!format!("{with_token:?}").contains("let-me-in"));
}

#[test]
fn connection_refused_is_retried_then_reported() {
    let port = common::free_port();
    let err = open_source(&format!("http://user:pw@127.0.0.1:{port}/m?sig=abc"), &fast_retries(1)).err().unwrap();
    let shown = err.to_string();
    assert_eq!(err.kind, ErrorKind::Io);
    assert!(shown.contains("gave up after 2 attempts"), "{shown}");
    assert!(!shown.contains("pw") && !shown.contains("sig=abc"), "credentials leaked: {shown}");
}
