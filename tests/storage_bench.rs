//! Loopback throughput of the remote readers against a single curl stream.
//!
//!     cargo test --release --test storage_bench -- --ignored --nocapture
//!
//! TENSORIZER_BENCH_MIB sets the object size (default 512). The S3 side uses `s3s-fs` if it is on
//! PATH (cargo install --locked s3s-fs --version 0.14.1 --features binary), else moto; both
//! without auth, so curl can fetch the same URL.
mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::{free_port, have, pattern, Moto, Nginx, Proc};
use tensorizer_rs::storage::{create_sink, open_source, StorageOptions};

const MIB: usize = 1 << 20;

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// GB/s of one curl download to /dev/null (`extra`: more curl arguments, e.g. a range).
fn curl_once(url: &str, extra: &[&str]) -> f64 {
    let out = Command::new("curl")
        .args(["-s", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().unwrap());
    let (bytes, secs) = (it.next().unwrap(), it.next().unwrap());
    bytes / secs / 1e9
}

/// Best of `runs` single-stream downloads with curl, in GB/s.
fn curl(url: &str, runs: usize) -> f64 {
    (0..runs).map(|_| curl_once(url, &[])).fold(0.0, f64::max)
}

/// One single-stream download of the first `len` bytes with curl, in GB/s.
fn curl_prefix(url: &str, len: usize) -> f64 {
    curl_once(url, &["-r", &format!("0-{}", len - 1)])
}

/// Best of `runs` whole-object reads with our reader, in GB/s (open included).
fn ours(uri: &str, opts: &StorageOptions, buf: &mut [u8], runs: usize) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let source = open_source(uri, opts).unwrap();
            source.read_at(0, buf).unwrap();
            gbps(buf.len(), t.elapsed().as_secs_f64())
        })
        .fold(0.0, f64::max)
}

/// GB/s of `n` concurrent curl processes, each fetching one contiguous range (the server's
/// ceiling as a parallel reference client sees it).
fn curl_parallel(url: &str, size: usize, n: usize) -> f64 {
    let step = size.div_ceil(n);
    let t = Instant::now();
    let kids: Vec<_> = (0..size)
        .step_by(step)
        .map(|a| {
            let range = format!("{a}-{}", (a + step).min(size) - 1);
            Command::new("curl").args(["-s", "-f", "-r", &range, "-o", "/dev/null", url]).spawn().unwrap()
        })
        .collect();
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    gbps(size, t.elapsed().as_secs_f64())
}

/// Best of `runs`: `threads` callers, each reading its share of the object in `chunk`-byte
/// `read_at` calls into its own reused buffer, as the load pipeline's readers do.
fn ours_threads(uri: &str, opts: &StorageOptions, size: usize, threads: usize, chunk: usize, runs: usize) -> f64 {
    let source = open_source(uri, opts).unwrap();
    let source = &*source;
    (0..runs)
        .map(|_| {
            let next = std::sync::atomic::AtomicUsize::new(0);
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    let next = &next;
                    s.spawn(move || {
                        let mut buf = vec![1u8; chunk];
                        loop {
                            let at = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
                            if at >= size {
                                break;
                            }
                            let n = chunk.min(size - at);
                            source.read_at(at as u64, &mut buf[..n]).unwrap();
                        }
                    });
                }
            });
            gbps(size, t.elapsed().as_secs_f64())
        })
        .fold(0.0, f64::max)
}

fn settings() -> Vec<(&'static str, StorageOptions)> {
    let o =
        |c: usize, r: usize| StorageOptions { max_concurrency: Some(c), request_size: Some(r), ..Default::default() };
    vec![
        ("1 stream (whole object)", o(1, usize::MAX / 2)),
        ("4 x 8 MiB", o(4, 8 * MIB)),
        ("8 x 8 MiB", o(8, 8 * MIB)),
        ("16 x 8 MiB", o(16, 8 * MIB)),
        ("32 x 8 MiB (default)", o(32, 8 * MIB)),
        ("64 x 4 MiB", o(64, 4 * MIB)),
        ("16 x 16 MiB", o(16, 16 * MIB)),
    ]
}

fn report(server: &str, uri: &str, curl_url: &str, base: &StorageOptions, size: usize, runs: usize) {
    let mut buf = vec![1u8; size];
    println!("{server}: curl, 1 stream: {:.2} GB/s", curl(curl_url, runs));
    for n in [8, 16, 32] {
        println!("{server}: curl, {n} streams: {:.2} GB/s", curl_parallel(curl_url, size, n));
    }
    for (threads, chunk) in [(12, 8 * MIB), (16, 8 * MIB), (32, 8 * MIB), (8, 32 * MIB)] {
        println!(
            "{server}: tensorizer-rs, {threads} callers x {} MiB reads: {:.2} GB/s",
            chunk / MIB,
            ours_threads(uri, base, size, threads, chunk, runs)
        );
    }
    for (name, o) in settings() {
        let o = StorageOptions { max_concurrency: o.max_concurrency, request_size: o.request_size, ..base.clone() };
        println!("{server}: tensorizer-rs {name}: {:.2} GB/s", ours(uri, &o, &mut buf, runs));
    }
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn loopback_read_throughput() {
    let size = std::env::var("TENSORIZER_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(512) * MIB;
    let data = pattern(size, 42);
    println!("object: {} MiB, {} CPUs", size / MIB, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));

    let only = std::env::var("TENSORIZER_BENCH_SERVERS").unwrap_or_else(|_| "nginx,s3".into());
    if !only.contains("nginx") {
    } else if let Some(nginx) = Nginx::start() {
        std::fs::write(nginx.root().join("bench.bin"), &data).unwrap();
        let url = nginx.url("bench.bin");
        report("nginx", &url, &url, &StorageOptions::default(), size, 3);
        if std::env::var_os("TENSORIZER_BENCH_SKIP_CAPPED").is_some() {
            return;
        }
        // Each connection capped at 10 MB/s (after a first-second burst), as object stores cap one
        // stream: what parallel ranges buy over a single stream.
        let slow = nginx.url("slow/bench.bin");
        let c =
            |c: usize| StorageOptions { max_concurrency: Some(c), request_size: Some(16 * MIB), ..Default::default() };
        println!(
            "nginx capped at 10 MB/s per connection: curl, 1 stream (64 MiB): {:.3} GB/s",
            curl_prefix(&slow, 64 * MIB)
        );
        let mut buf = vec![1u8; size];
        for n in [8, 32] {
            println!(
                "nginx capped at 10 MB/s per connection: tensorizer-rs {n} x 16 MiB: {:.3} GB/s",
                ours(&slow, &c(n), &mut buf, 1)
            );
        }
    }

    // S3: s3s-fs if installed, else moto.
    if !only.contains("s3") {
        return;
    }
    let anon = |endpoint: String| StorageOptions {
        s3_access_key_id: Some(String::new()),
        s3_secret_access_key: Some(String::new()),
        s3_endpoint: Some(endpoint),
        ..Default::default()
    };
    let (name, endpoint, _server): (&str, String, Box<dyn std::any::Any>) =
        if Command::new("sh").args(["-c", "command -v s3s-fs"]).stdout(Stdio::null()).status().unwrap().success() {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("bench")).unwrap();
            let port = free_port();
            let child = Command::new("s3s-fs")
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let proc = Proc::new(child);
            wait_port(port);
            ("s3s-fs", format!("http://127.0.0.1:{port}"), Box::new((proc, dir)))
        } else if have("python3", "") {
            let moto = Moto::start(false).unwrap();
            moto.create_bucket("bench");
            ("moto", moto.endpoint(), Box::new(moto))
        } else {
            return;
        };
    let opts = anon(endpoint.clone());
    let t = Instant::now();
    let sink = create_sink("s3://bench/bench.bin", &opts).unwrap();
    for (i, chunk) in data.chunks(4 * MIB).enumerate() {
        sink.write_at((i * 4 * MIB) as u64, chunk).unwrap();
    }
    sink.finish().unwrap();
    println!("{name}: tensorizer-rs multipart upload: {:.2} GB/s", gbps(size, t.elapsed().as_secs_f64()));
    report(name, "s3://bench/bench.bin", &format!("{endpoint}/bench/bench.bin"), &opts, size, 3);
}

fn wait_port(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("server did not start on {port}");
}
