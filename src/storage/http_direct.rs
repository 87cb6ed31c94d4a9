//! `http://` and `https://` ranged GETs whose bodies go from the socket (through rustls for
//! HTTPS) straight into the buffers a streamed read lends ([`StreamDest`]), on the reading
//! thread itself. Through reqwest each body
//! is read by a runtime worker into hyper's buffer, handed across threads and copied once more:
//! on the H200 host an 8 GiB load to CUDA spent 2.5 CPU-seconds in the workers and 1.5 in that
//! second copy, on a machine the server shares (docs/benchmarks.md).
//!
//! Used only where it cannot change behaviour: HTTP/1.x, no proxy configured, no user info, the
//! probe (through reqwest, which also settled that the server's certificate is trusted)
//! answered 206 from the URL itself (no redirect). HTTPS uses a rustls client with reqwest's
//! provider and roots ([`super::tls::client_config`]). A response that is not a
//! plain 206 of the asked length (redirects, errors, chunked or coded bodies) makes the caller
//! send the request again through reqwest, which handles it as always; nothing reaches the
//! destination before the head has been checked. Connections are kept alive in a small pool.
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE};
use reqwest::header::{CONTENT_ENCODING, TRANSFER_ENCODING, USER_AGENT};
use reqwest::{StatusCode, Url};

use super::http::status_failure;
use super::ranged::{changed, ContentRange, Progress};
use super::retry::Failure;
use super::{Stop, StreamDest};
use crate::error::Error;

/// Largest response head we accept.
const HEAD_MAX: usize = 64 << 10;
/// Headers a response may have here (S3 metadata can bring dozens); more go to reqwest.
const HEADERS_MAX: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request that cannot be sent for this long fails (and is retried).
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// A read waiting for bytes wakes this often to see whether its load was stopped (Ctrl-C, or
/// another part of the load failed) and whether the request has stalled (`Progress::verdict`:
/// silent for the stall timeout, or for a few seconds while the source's other requests flow).
const POLL: Duration = Duration::from_millis(250);
/// Idle connections kept for later requests.
const POOL_MAX: usize = 64;

/// Body bytes read this way, process-wide: tests check which path a load took.
static DIRECT_BYTES: AtomicU64 = AtomicU64::new(0);

pub fn direct_bytes() -> u64 {
    DIRECT_BYTES.load(Ordering::Relaxed)
}

/// What one direct request gave.
pub(crate) enum Outcome {
    /// The body went to the destination (`filled` counts it): the request is done.
    Done,
    /// The response needs reqwest's general handling; nothing went to the destination.
    Fallback,
}

pub(crate) struct Direct {
    /// `host:port` to connect to, and the `Host` header's value.
    addr: String,
    host: String,
    target: String,
    /// For `https://`: the client configuration and the name the certificate must carry.
    tls: Option<(Arc<rustls::ClientConfig>, rustls_pki_types::ServerName<'static>)>,
    idle: Mutex<Vec<Conn>>,
}

/// One connection: a TCP stream, or a TLS session over one.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Whether the environment routes this scheme through a proxy (reqwest would honour it).
fn proxied(scheme: &str, env: &dyn Fn(&str) -> Option<String>) -> bool {
    let keys: &[&str] = if scheme == "https" {
        &["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
    } else {
        &["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
    };
    keys.iter().any(|k| env(k).is_some_and(|v| !v.is_empty()))
}

fn io_failure(what: &str, e: std::io::Error) -> Failure {
    Failure::transient(Error::io(format!("{what}: {e}")))
}

impl Direct {
    /// A direct client for `url`, or `None` where reqwest must do the work. `tls` is the
    /// client configuration for `https://` (none: HTTPS goes through reqwest).
    pub fn new(
        url: &Url,
        env: &dyn Fn(&str) -> Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Option<Self> {
        let scheme = url.scheme();
        if !matches!(scheme, "http" | "https") || proxied(scheme, env) {
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            return None;
        }
        let tls = match (scheme, tls) {
            ("http", _) => None,
            (_, Some(config)) => {
                // An IP address or a DNS name (IPv6 hosts come in brackets).
                let bare = url.host_str()?.trim_start_matches('[').trim_end_matches(']');
                Some((config, rustls_pki_types::ServerName::try_from(bare.to_string()).ok()?))
            }
            _ => return None,
        };
        let host = url.host_str()?.to_string();
        let port = url.port_or_known_default()?;
        let mut target = url.path().to_string();
        if let Some(q) = url.query() {
            target.push('?');
            target.push_str(q);
        }
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        Some(Direct { addr: format!("{host}:{port}"), host: host_header, target, tls, idle: Mutex::new(Vec::new()) })
    }

    fn connect(&self) -> Result<Conn, Failure> {
        let tcp = self.connect_tcp()?;
        let Some((config, name)) = &self.tls else { return Ok(Conn::Plain(tcp)) };
        // The handshake runs within the first write and read of the request.
        let session = rustls::ClientConnection::new(config.clone(), name.clone())
            .map_err(|e| Failure::fatal(Error::io(format!("TLS setup: {e}"))))?;
        Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(session, tcp))))
    }

    fn connect_tcp(&self) -> Result<TcpStream, Failure> {
        let addrs = self.addr.to_socket_addrs().map_err(|e| io_failure(&format!("cannot resolve {}", self.addr), e))?;
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(conn) => {
                    crate::trace::mark("http_connect", 0, 0);
                    let _ = conn.set_nodelay(true);
                    conn.set_read_timeout(Some(POLL)).map_err(|e| io_failure("socket", e))?;
                    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| io_failure("socket", e))?;
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => io_failure("cannot connect", e),
            None => Failure::transient(Error::io(format!("{} resolved to no address", self.addr))),
        })
    }

    /// GET `offset..offset + len` of an object of `size` bytes, sending `headers`, into `dest`,
    /// counting bytes in `progress`; `check` vets the response's headers (validators). Blocks
    /// the calling thread; gives up (a fatal failure) once `stop` is set.
    #[allow(clippy::too_many_arguments)]
    pub fn fetch(
        &self,
        offset: u64,
        len: usize,
        size: u64,
        headers: &HeaderMap,
        check: &dyn Fn(&HeaderMap) -> Result<(), Failure>,
        dest: &mut dyn StreamDest,
        stop: &Stop,
        progress: &Progress,
    ) -> Result<Outcome, Failure> {
        let stopped = || stop.is_stopped();
        let last = offset + len as u64 - 1;
        let mut req =
            format!("GET {} HTTP/1.1\r\nHost: {}\r\nRange: bytes={offset}-{last}\r\n", self.target, self.host)
                .into_bytes();
        if !headers.contains_key(USER_AGENT) {
            req.extend_from_slice(concat!("User-Agent: tensorizer-rs/", env!("CARGO_PKG_VERSION"), "\r\n").as_bytes());
        }
        for (name, value) in headers {
            req.extend_from_slice(name.as_str().as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(value.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        crate::trace::mark("http_request", offset, len as u64);
        // A pooled connection may have been closed by the server meanwhile: if it fails before
        // the first response byte, try once more on a new one (nothing was lost), unless the
        // load has stopped meanwhile.
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut head = Vec::with_capacity(16 << 10);
        let mut conn = match pooled {
            Some(mut c) => match exchange(&mut c, &req, &mut head, progress, &stopped) {
                Ok(()) => c,
                Err(_) if head.is_empty() && !stopped() => {
                    let mut c = self.connect()?;
                    exchange(&mut c, &req, &mut head, progress, &stopped)?;
                    c
                }
                Err(f) => return Err(f),
            },
            None => {
                let mut c = self.connect()?;
                exchange(&mut c, &req, &mut head, progress, &stopped)?;
                c
            }
        };
        let (head_len, map, keep_alive) = loop {
            let mut hs = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let mut resp = httparse::Response::new(&mut hs);
            // What this parser does not take (more headers, a stray byte left on a pooled
            // connection) goes to reqwest on a connection of its own.
            let Ok(parsed) = resp.parse(&head) else { return Ok(Outcome::Fallback) };
            let httparse::Status::Complete(head_len) = parsed else {
                if head.len() >= HEAD_MAX {
                    return Err(Failure::fatal(Error::io("HTTP response head too large")));
                }
                // A head that trickles in never leaves the socket idle: look at the stop and
                // the stall clock (only body bytes count as progress) between reads.
                idle(progress, &stopped)?;
                quickack(&conn);
                read_more(&mut conn, &mut head, progress, &stopped)?;
                continue;
            };
            let code = StatusCode::from_u16(resp.code.unwrap_or(0)).unwrap_or(StatusCode::BAD_GATEWAY);
            match code {
                // Interim responses (100 Continue, 103 Early Hints) precede the real one.
                c if c.is_informational() && c != StatusCode::SWITCHING_PROTOCOLS => {
                    head.drain(..head_len);
                    idle(progress, &stopped)?;
                    if head.is_empty() {
                        read_more(&mut conn, &mut head, progress, &stopped)?;
                    }
                    continue;
                }
                StatusCode::PARTIAL_CONTENT => {}
                StatusCode::PRECONDITION_FAILED => return Err(changed("the server refused the version seen at open")),
                StatusCode::RANGE_NOT_SATISFIABLE => return Err(changed("the requested range no longer exists")),
                // A whole-object 200 or a redirect: reqwest's handling.
                c if c.is_success() || c.is_redirection() => return Ok(Outcome::Fallback),
                c => return Err(status_failure(c)),
            }
            let mut map = HeaderMap::new();
            for h in resp.headers.iter() {
                if let (Ok(name), Ok(value)) =
                    (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value))
                {
                    map.append(name, value);
                }
            }
            let close = map.get_all(CONNECTION).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            break (head_len, map, resp.version == Some(1) && !close);
        };
        let coded = [TRANSFER_ENCODING, CONTENT_ENCODING]
            .iter()
            .any(|h| map.get(h).is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity")));
        let length = map.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        if coded || length != Some(len as u64) {
            return Ok(Outcome::Fallback);
        }
        ContentRange::check(map.get(CONTENT_RANGE).and_then(|v| v.to_str().ok()), offset, size)?;
        check(&map)?;
        crate::trace::mark("http_head", offset, len as u64);
        // The body: what came with the head, then straight from the socket.
        let early = &head[head_len..];
        if early.len() > len {
            return Err(Failure::fatal(Error::io("the server sent more bytes than were asked for")));
        }
        dest.put(early).map_err(Failure::fatal)?;
        DIRECT_BYTES.fetch_add(early.len() as u64, Ordering::Relaxed);
        let mut got = early.len();
        progress.add(got);
        while got < len {
            // A trickling server never leaves the socket idle: look at the stop between reads.
            if stopped() {
                return Err(Failure::fatal(Stop::error()));
            }
            if len - got <= QUICKACK_TAIL {
                quickack(&conn);
            }
            let room = dest.room().map_err(Failure::fatal)?;
            let want = room.len().min(len - got);
            let n = match conn.read(&mut room[..want]) {
                Ok(0) => {
                    return Err(Failure::transient(Error::io(format!(
                        "the connection closed after {got} of {len} bytes"
                    ))))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if waited(&e) => {
                    idle(progress, &stopped)?;
                    continue;
                }
                Err(e) => return Err(io_failure("reading the body", e)),
            };
            dest.advance(n).map_err(Failure::fatal)?;
            DIRECT_BYTES.fetch_add(n as u64, Ordering::Relaxed);
            got += n;
            progress.add(n);
        }
        crate::trace::mark("http_body_done", offset, len as u64);
        if keep_alive {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < POOL_MAX {
                idle.push(conn);
            }
        }
        Ok(Outcome::Done)
    }
}

/// Send the request and read at least the start of the response into `head`.
fn exchange(
    conn: &mut Conn,
    req: &[u8],
    head: &mut Vec<u8>,
    progress: &Progress,
    stopped: &dyn Fn() -> bool,
) -> Result<(), Failure> {
    // Over TLS the first write runs the handshake, whose reads may come back after `POLL`
    // with nothing: those are waits like any other, not failures.
    let (mut sent, start) = (0, Instant::now());
    while sent < req.len() {
        match conn.write(&req[sent..]) {
            Ok(0) => return Err(Failure::transient(Error::io("the connection closed before the request was sent"))),
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if waited(&e) && start.elapsed() < IO_TIMEOUT => idle(progress, stopped)?,
            Err(e) => return Err(io_failure("sending the request", e)),
        }
    }
    conn.flush().map_err(|e| io_failure("sending the request", e))?;
    quickack(conn);
    read_more(conn, head, progress, stopped)
}

/// A read that came back empty-handed after `POLL`.
fn waited(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// After a read found no bytes: go on waiting unless the load was stopped (fatal: nothing to
/// retry) or the request has stalled (transient: see `Progress::verdict`).
fn idle(progress: &Progress, stopped: &dyn Fn() -> bool) -> Result<(), Failure> {
    if stopped() {
        return Err(Failure::fatal(Error::io("stopped: the load was stopped")));
    }
    progress.verdict()
}

/// The last bytes of a response within which every read first acknowledges what came.
const QUICKACK_TAIL: usize = 256 << 10;

/// Acknowledge received data now rather than after the delayed-ACK timer. A server that holds
/// back a response's last small segment until its previous one is acknowledged (Nagle; nginx
/// with `tcp_nopush`) otherwise waits out our delayed ACK: 40 ms for each 64 KiB response
/// over loopback on the H200 host (docs/benchmarks.md). Linux clears the flag on its own, so
/// it is set again before each read near a response's end. Best effort.
fn quickack(conn: &Conn) {
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(conn.tcp()).set_tcp_quickack(true);
    #[cfg(not(target_os = "linux"))]
    let _ = conn;
}

fn read_more(
    conn: &mut Conn,
    head: &mut Vec<u8>,
    progress: &Progress,
    stopped: &dyn Fn() -> bool,
) -> Result<(), Failure> {
    let mut buf = [0u8; 16 << 10];
    let n = loop {
        match conn.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if waited(&e) => idle(progress, stopped)?,
            Err(e) => return Err(io_failure("reading the response", e)),
        }
    };
    if n == 0 {
        return Err(Failure::transient(Error::io("the connection closed before a response")));
    }
    head.extend_from_slice(&buf[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_without_proxy() {
        let none = |_: &str| None;
        let url = |s: &str| Url::parse(s).unwrap();
        let d = Direct::new(&url("http://127.0.0.1:8080/a/b.tensors?x=1"), &none, None).unwrap();
        assert_eq!(
            (d.addr.as_str(), d.host.as_str(), d.target.as_str()),
            ("127.0.0.1:8080", "127.0.0.1:8080", "/a/b.tensors?x=1")
        );
        let d = Direct::new(&url("http://example.com/m"), &none, None).unwrap();
        assert_eq!((d.addr.as_str(), d.host.as_str()), ("example.com:80", "example.com"));
        assert!(Direct::new(&url("https://example.com/m"), &none, None).is_none());
        assert!(Direct::new(&url("http://u:p@example.com/m"), &none, None).is_none());
        let proxy = |k: &str| (k == "HTTP_PROXY").then(|| "http://proxy:3128".to_string());
        assert!(Direct::new(&url("http://example.com/m"), &proxy, None).is_none());
    }

    #[test]
    fn https_with_a_client_configuration() {
        let none = |_: &str| None;
        let url = |s: &str| Url::parse(s).unwrap();
        let config = crate::storage::tls::client_config(&crate::storage::tls::Trust::Insecure).unwrap();
        let d = Direct::new(&url("https://example.com/m"), &none, Some(config.clone())).unwrap();
        assert_eq!((d.addr.as_str(), d.host.as_str()), ("example.com:443", "example.com"));
        let d = Direct::new(&url("https://127.0.0.1:8443/m"), &none, Some(config.clone())).unwrap();
        assert_eq!(d.addr, "127.0.0.1:8443");
        assert!(matches!(d.tls, Some((_, rustls_pki_types::ServerName::IpAddress(_)))));
        // An HTTPS proxy in the environment leaves https:// to reqwest; an HTTP one does not.
        let proxy = |k: &str| (k == "HTTPS_PROXY").then(|| "http://proxy:3128".to_string());
        assert!(Direct::new(&url("https://example.com/m"), &proxy, Some(config.clone())).is_none());
        assert!(Direct::new(&url("http://example.com/m"), &proxy, None).is_some());
    }
}
