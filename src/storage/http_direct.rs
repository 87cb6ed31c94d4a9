//! Plain `http://` ranged GETs whose bodies are read from the socket straight into the caller's
//! buffer. reqwest (hyper) reads each body into its own buffer, hands it across tasks and we copy
//! it again: on a fast link that second copy and the hand-offs cost more CPU than the transfer,
//! capping loads at ~40 % of what the same server gives plain `curl` streams (docs/benchmarks.md).
//!
//! Used only where it cannot change behaviour: plain HTTP/1.x, no proxy configured, no redirect
//! seen at open, and the server answering ranged requests. Anything unexpected (chunked or coded
//! bodies, a 200 instead of a 206) makes the caller fall back to reqwest for that request; HTTP
//! errors are mapped as reqwest's responses are. Connections are kept alive in a small pool.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_RANGE};
use reqwest::{StatusCode, Url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ranged::{changed, ContentRange};
use super::retry::Failure;
use crate::error::Error;

/// Largest response head we accept.
const HEAD_MAX: usize = 64 << 10;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte for this long on an open connection: drop it and retry the rest (as reqwest's).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Body bytes read this way, process-wide (tests check which path a load took).
static DIRECT_BYTES: AtomicU64 = AtomicU64::new(0);

pub fn direct_bytes() -> u64 {
    DIRECT_BYTES.load(Ordering::Relaxed)
}

/// What one direct request gave.
pub(crate) enum Outcome {
    /// The body is in the buffer (or part of it, see `filled`): the request is done.
    Done,
    /// The response needs reqwest's general handling; nothing was written to the buffer.
    Fallback,
}

pub(crate) struct Direct {
    /// `host:port` to connect to, and the `Host` header's value.
    addr: String,
    host: String,
    target: String,
    idle: Mutex<Vec<TcpStream>>,
}

/// Whether the environment routes plain HTTP through a proxy (reqwest would honour it).
fn proxied(env: &dyn Fn(&str) -> Option<String>) -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"].iter().any(|k| env(k).is_some_and(|v| !v.is_empty()))
}

impl Direct {
    /// A direct client for `url`, or `None` where reqwest must do the work.
    pub fn new(url: &Url, env: &dyn Fn(&str) -> Option<String>) -> Option<Self> {
        if url.scheme() != "http" || proxied(env) || !url.username().is_empty() || url.password().is_some() {
            return None;
        }
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
        Some(Direct { addr: format!("{host}:{port}"), host: host_header, target, idle: Mutex::new(Vec::new()) })
    }

    async fn connect(&self) -> Result<TcpStream, Failure> {
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| Failure::transient(Error::io("connecting timed out")))?
            .map_err(|e| Failure::transient(Error::io(format!("cannot connect: {e}"))))?;
        let _ = conn.set_nodelay(true);
        Ok(conn)
    }

    /// GET `offset..offset + dst.len()` with `headers` into `dst`, counting bytes in `filled`.
    pub async fn fetch(
        &self,
        offset: u64,
        size: u64,
        headers: &HeaderMap,
        check: &(dyn Fn(&HeaderMap) -> Result<(), Failure> + Sync),
        dst: &mut [u8],
        filled: &mut usize,
    ) -> Result<Outcome, Failure> {
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: tensorizer-rs/{}\r\nRange: bytes={}-{}\r\n",
            self.target,
            self.host,
            env!("CARGO_PKG_VERSION"),
            offset,
            offset + dst.len() as u64 - 1
        )
        .into_bytes();
        for (name, value) in headers {
            req.extend_from_slice(name.as_str().as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(value.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        // A pooled connection may have been closed by the server meanwhile: if it fails before
        // the first response byte, try once more on a new one (no backoff, nothing was lost).
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (mut conn, reused) = match pooled {
            Some(c) => (c, true),
            None => (self.connect().await?, false),
        };
        let mut head = Vec::with_capacity(8 << 10);
        if let Err(f) = exchange(&mut conn, &req, &mut head).await {
            if !reused || !head.is_empty() {
                return Err(f);
            }
            conn = self.connect().await?;
            exchange(&mut conn, &req, &mut head).await?;
        }
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut hs);
            let parsed =
                resp.parse(&head).map_err(|e| Failure::fatal(Error::io(format!("invalid HTTP response: {e}"))))?;
            let httparse::Status::Complete(head_len) = parsed else {
                if head.len() >= HEAD_MAX {
                    return Err(Failure::fatal(Error::io("HTTP response head too large")));
                }
                read_more(&mut conn, &mut head).await?;
                continue;
            };
            let code = resp.code.unwrap_or(0);
            let keep_alive = resp.version == Some(1);
            let mut map = HeaderMap::new();
            let mut close = false;
            let mut length = None;
            let mut plain_body = true;
            for h in resp.headers.iter() {
                let (Ok(name), Ok(value)) =
                    (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value))
                else {
                    continue;
                };
                if name == reqwest::header::CONNECTION && value.as_bytes().eq_ignore_ascii_case(b"close") {
                    close = true;
                }
                if name == reqwest::header::CONTENT_LENGTH {
                    length = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok());
                }
                if name == reqwest::header::TRANSFER_ENCODING || name == reqwest::header::CONTENT_ENCODING {
                    plain_body = value.as_bytes().eq_ignore_ascii_case(b"identity");
                }
                map.append(name, value);
            }
            match StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY) {
                StatusCode::PARTIAL_CONTENT => {}
                StatusCode::PRECONDITION_FAILED => return Err(changed("the server refused the version seen at open")),
                StatusCode::RANGE_NOT_SATISFIABLE => return Err(changed("the requested range no longer exists")),
                // Anything else (a whole-object 200, redirects, errors): reqwest's handling.
                _ => return Ok(Outcome::Fallback),
            }
            if !plain_body || length != Some(dst.len() as u64) {
                return Ok(Outcome::Fallback);
            }
            ContentRange::check(map.get(CONTENT_RANGE).and_then(|v| v.to_str().ok()), offset, size)?;
            check(&map)?;
            // The body: what came with the head, then straight from the socket.
            let early = &head[head_len..];
            if early.len() > dst.len() {
                return Err(Failure::fatal(Error::io("the server sent more bytes than were asked for")));
            }
            dst[..early.len()].copy_from_slice(early);
            let mut got = early.len();
            *filled += got;
            while got < dst.len() {
                let n = match tokio::time::timeout(READ_TIMEOUT, conn.read(&mut dst[got..])).await {
                    Err(_) => return Err(Failure::transient(Error::io("no data for 60 s"))),
                    Ok(Err(e)) => return Err(Failure::transient(Error::io(format!("reading the body: {e}")))),
                    Ok(Ok(n)) => n,
                };
                if n == 0 {
                    return Err(Failure::transient(Error::io(format!(
                        "the connection closed after {got} of {} bytes",
                        dst.len()
                    ))));
                }
                got += n;
                *filled += n;
            }
            DIRECT_BYTES.fetch_add(got as u64, Ordering::Relaxed);
            if keep_alive && !close {
                self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            }
            return Ok(Outcome::Done);
        }
    }
}

/// Send the request and read at least the start of the response into `head`.
async fn exchange(conn: &mut TcpStream, req: &[u8], head: &mut Vec<u8>) -> Result<(), Failure> {
    conn.write_all(req).await.map_err(|e| Failure::transient(Error::io(format!("sending the request: {e}"))))?;
    read_more(conn, head).await
}

async fn read_more(conn: &mut TcpStream, head: &mut Vec<u8>) -> Result<(), Failure> {
    let mut buf = [0u8; 8 << 10];
    let n = match tokio::time::timeout(READ_TIMEOUT, conn.read(&mut buf)).await {
        Err(_) => return Err(Failure::transient(Error::io("no response for 60 s"))),
        Ok(Err(e)) => return Err(Failure::transient(Error::io(format!("reading the response: {e}")))),
        Ok(Ok(n)) => n,
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
        let d = Direct::new(&url("http://127.0.0.1:8080/a/b.tensors?x=1"), &none).unwrap();
        assert_eq!(
            (d.addr.as_str(), d.host.as_str(), d.target.as_str()),
            ("127.0.0.1:8080", "127.0.0.1:8080", "/a/b.tensors?x=1")
        );
        let d = Direct::new(&url("http://example.com/m"), &none).unwrap();
        assert_eq!((d.addr.as_str(), d.host.as_str()), ("example.com:80", "example.com"));
        assert!(Direct::new(&url("https://example.com/m"), &none).is_none());
        assert!(Direct::new(&url("http://u:p@example.com/m"), &none).is_none());
        let proxy = |k: &str| (k == "HTTP_PROXY").then(|| "http://proxy:3128".to_string());
        assert!(Direct::new(&url("http://example.com/m"), &proxy).is_none());
    }
}
