//! Real servers on 127.0.0.1 for the storage tests: nginx, a Python HTTP/1.0 server with
//! injected faults, and moto's S3 server. Each runs as a child process on a free port and is
//! killed when its handle drops.
//!
//! Needs: `nginx` (apt-get install -y nginx) and `python3` with `moto[server]` (pip install
//! 'moto[server]'). Set TENSORIZER_SKIP_SERVER_TESTS=1 to skip these tests where they are missing.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether server tests should run; panics with the install hint if a tool is missing, unless
/// TENSORIZER_SKIP_SERVER_TESTS is set.
pub fn have(tool: &str, install: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("TENSORIZER_SKIP_SERVER_TESTS").is_some() {
            eprintln!("skipping: {tool} not found ({install})");
            return false;
        }
        panic!("{tool} not found: {install} (or set TENSORIZER_SKIP_SERVER_TESTS=1)");
    }
    true
}

/// The Python that runs moto: TENSORIZER_TEST_PYTHON, else `python3`.
pub fn python() -> String {
    std::env::var("TENSORIZER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// moto >= 5.2.2: older 5.2.x answer CompleteMultipartUpload with the wrong XML root element,
/// which the AWS SDK for Rust rejects (getmoto/moto#10055).
pub fn have_moto() -> bool {
    let py = python();
    if !have(&py, "install python3") {
        return false;
    }
    let check = "import moto.server, flask, boto3; v = tuple(int(x) for x in moto.__version__.split('.')[:3]); assert v >= (5, 2, 2), v";
    let ok = Command::new(&py).args(["-c", check]).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    if !ok {
        let hint = "pip install 'moto[server]>=5.2.2'";
        if std::env::var_os("TENSORIZER_SKIP_SERVER_TESTS").is_some() {
            eprintln!("skipping: {py} has no moto >= 5.2.2 ({hint})");
            return false;
        }
        panic!("{py} has no moto >= 5.2.2: {hint} (or set TENSORIZER_SKIP_SERVER_TESTS=1)");
    }
    true
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited ({status}): {}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not listen on {port}: {}", std::fs::read_to_string(log).unwrap_or_default());
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn new(child: Child) -> Self {
        Proc { child }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx serving `root` (a temp dir), one process, access log with the Range header and the
/// connection number of each request.
pub struct Nginx {
    pub port: u16,
    pub dir: tempfile::TempDir,
    _proc: Proc,
}

impl Nginx {
    pub fn start() -> Option<Nginx> {
        if !have("nginx", "apt-get install -y nginx") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("root")).unwrap();
        let port = free_port();
        let user = if unsafe { libc::geteuid() } == 0 { "user root;" } else { "" };
        // One process by default; benchmarks set TENSORIZER_NGINX_WORKERS for a real server.
        let workers = match std::env::var("TENSORIZER_NGINX_WORKERS").ok().and_then(|v| v.parse::<usize>().ok()) {
            Some(n) => format!("master_process on;\nworker_processes {n};"),
            None => "master_process off;".to_string(),
        };
        let conf = format!(
            r#"
{user}
daemon off;
{workers}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format ranges '$request_method $uri "$http_range" $status $body_bytes_sent $connection $connection_requests $msec $request_time';
    access_log {d}/access.log ranges;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {d}/root;
        location /moved/ {{ rewrite ^/moved/(.*)$ /$1 redirect; }}
        # A per-connection throughput cap, as object stores have: 10 MB/s per request (nginx lets
        # the first second's worth through at once).
        location /slow/ {{ alias {d}/root/; limit_rate 10m; }}
    }}
}}
"#,
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let log = d.join("error.log");
        let mut child = Command::new("nginx")
            .arg("-e")
            .arg(&log)
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log")).unwrap())
            .spawn()
            .expect("cannot start nginx");
        wait_for_port(port, &mut child, &d.join("stderr.log"));
        Some(Nginx { port, dir, _proc: Proc { child } })
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// tests/servers/http_server.py: HTTP/1.0, Range, injected faults.
pub struct PyHttp {
    pub port: u16,
    pub dir: tempfile::TempDir,
    _proc: Proc,
}

impl PyHttp {
    pub fn start() -> Option<PyHttp> {
        if !have("python3", "install python3") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/http_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| panic!("http_server.py printed {line:?}"));
        Some(PyHttp { port, dir, _proc: Proc { child } })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// Requests seen per path.
    pub fn count(&self, path: &str) -> u64 {
        let body = tensorizer_rs::storage::read_all(&self.url("__stats"), &Default::default()).unwrap();
        let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
        stats.get(format!("/{path}")).and_then(|v| v.as_u64()).unwrap_or(0)
    }
}

/// moto's S3 server (tests/servers/moto_s3.py); with `auth`, requests must be signed with
/// `access_key`/`secret_key`.
pub struct Moto {
    pub port: u16,
    pub access_key: String,
    pub secret_key: String,
    log: tempfile::NamedTempFile,
    _proc: Proc,
}

impl Moto {
    pub fn start(auth: bool) -> Option<Moto> {
        if !have_moto() {
            return None;
        }
        let log = tempfile::NamedTempFile::new().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/moto_s3.py");
        let mut cmd = Command::new(python());
        cmd.arg(script);
        if auth {
            cmd.arg("--auth");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("cannot start python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            panic!("moto_s3.py printed {line:?}: {}", std::fs::read_to_string(log.path()).unwrap_or_default())
        });
        let s = |k: &str| info.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
        Some(Moto {
            port: info["port"].as_u64().unwrap() as u16,
            access_key: s("access_key"),
            secret_key: s("secret_key"),
            log,
            _proc: Proc { child },
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Options that reach this server with its credentials (anonymous without auth).
    pub fn options(&self) -> tensorizer_rs::storage::StorageOptions {
        tensorizer_rs::storage::StorageOptions {
            s3_access_key_id: Some(self.access_key.clone()),
            s3_secret_access_key: Some(self.secret_key.clone()),
            s3_endpoint: Some(self.endpoint()),
            s3_region: Some("us-east-1".into()),
            ..Default::default()
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// An SDK client for checks the storage API does not offer (buckets, listings).
    pub fn sdk(&self) -> (tokio::runtime::Runtime, aws_sdk_s3::Client) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let creds = aws_credential_types::Credentials::new(&self.access_key, &self.secret_key, None, None, "test");
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .credentials_provider(creds)
            .endpoint_url(self.endpoint())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .force_path_style(true)
            .build();
        (rt, aws_sdk_s3::Client::from_conf(conf))
    }

    pub fn create_bucket(&self, name: &str) {
        let (rt, client) = self.sdk();
        rt.block_on(client.create_bucket().bucket(name).send()).unwrap();
    }
}
