//! `http://` and `https://` sources: parallel ranged GETs with reqwest (rustls), redirects followed,
//! HTTP/1.0 servers accepted, every response checked against the ETag/Last-Modified seen at open.
//! Trusted CAs: `storage::tls` (system roots, or a bundle from `ca_bundle` / `REQUESTS_CA_BUNDLE` /
//! `CURL_CA_BUNDLE`).
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_MATCH,
    IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE,
};
use reqwest::{StatusCode, Url};

use super::http_direct::{Direct, Outcome};
use super::ranged::{
    changed, error_chain, ContentRange, Filler, Opened, Out, Progress, RangeFetch, RangedSource, PROBE_LEN,
};
use super::retry::Failure;
use super::tls::{self, Trust};
use super::StorageOptions;
use crate::error::{Error, ErrorKind, Result};

pub(crate) type HttpSource = RangedSource<HttpFetch>;

/// One client (and connection pool) per set of trusted roots and redirect policy, for the
/// whole process. `same_origin`: redirects stay on the URL's scheme, host and port (requests
/// that carry the caller's `http_headers`: reqwest drops only `Authorization` and cookies on
/// the way to another host, and an API key in a header of another name would follow).
fn client(trust: &Trust, same_origin: bool) -> Result<reqwest::Client> {
    static CLIENTS: OnceLock<Mutex<HashMap<(Trust, bool), reqwest::Client>>> = OnceLock::new();
    let cache = CLIENTS.get_or_init(Default::default);
    let key = (trust.clone(), same_origin);
    if let Some(c) = cache.lock().unwrap().get(&key) {
        return Ok(c.clone());
    }
    let policy = if same_origin {
        reqwest::redirect::Policy::custom(|attempt| {
            let first = &attempt.previous()[0];
            if attempt.previous().len() > 10 {
                attempt.error("too many redirects")
            } else if attempt.url().origin() != first.origin() {
                let to = shown_url(attempt.url());
                attempt.error(format!(
                    "redirected to another host ({to}): not followed, since the request carries the caller's http_headers"
                ))
            } else {
                attempt.follow()
            }
        })
    } else {
        reqwest::redirect::Policy::limited(10)
    };
    // The same rustls configuration as the direct client's (tls::client_config): one place
    // decides which roots are trusted.
    let tls = tls::client_config(trust)?;
    let builder = reqwest::Client::builder()
        .user_agent(concat!("tensorizer-rs/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        // No read timeout here: every request is watched for silence (`ranged::Progress`),
        // with the source's stall timeout and hedging.
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(policy)
        .use_preconfigured_tls((*tls).clone());
    let client =
        builder.build().map_err(|e| Error::io(format!("cannot create the HTTP client: {}", error_chain(&e))))?;
    cache.lock().unwrap().insert(key, client.clone());
    Ok(client)
}

/// The URL as shown in messages: no user info, no query string (it may hold a signature).
fn shown_url(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    if url.query().is_some() {
        shown.push_str("?…");
    }
    shown
}

/// What identifies the version of the object that was opened.
#[derive(Debug, Clone, Default)]
struct Validator {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
}

impl Validator {
    fn from_headers(h: &HeaderMap) -> Self {
        Validator { etag: h.get(ETAG).cloned(), last_modified: h.get(LAST_MODIFIED).cloned() }
    }

    /// Conditions that make the server refuse (412) a different version.
    fn condition(&self) -> Option<(HeaderName, HeaderValue)> {
        match (&self.etag, &self.last_modified) {
            // If-Match compares strongly: a weak ETag would never match.
            (Some(etag), _) if !etag.as_bytes().starts_with(b"W/") => Some((IF_MATCH, etag.clone())),
            (_, Some(lm)) => Some((IF_UNMODIFIED_SINCE, lm.clone())),
            _ => None,
        }
    }

    /// Compare a response's validators with the ones seen at open (for servers that ignore
    /// conditional headers).
    fn check(&self, h: &HeaderMap) -> Result<(), Failure> {
        let show = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
        if let (Some(a), Some(b)) = (&self.etag, h.get(ETAG)) {
            if a != b {
                return Err(changed(&format!("ETag {} became {}", show(a), show(b))));
            }
        }
        if let (Some(a), Some(b)) = (&self.last_modified, h.get(LAST_MODIFIED)) {
            if a != b {
                return Err(changed(&format!("Last-Modified {} became {}", show(a), show(b))));
            }
        }
        Ok(())
    }
}

pub struct HttpFetch {
    client: reqwest::Client,
    /// Plain-HTTP bodies read straight into lent buffers, where that is safe (`http_direct`).
    direct: Option<Direct>,
    url: Url,
    headers: HeaderMap,
    validator: Validator,
    size: u64,
    ranges: bool,
}

fn request_failure(e: reqwest::Error) -> Failure {
    let e = e.without_url();
    if let Some(msg) = tls::certificate_error(&e) {
        return Failure::fatal(Error::io(msg)); // another try would fail the same way
    }
    let msg = error_chain(&e);
    if e.is_builder() || e.is_redirect() {
        Failure::fatal(Error::io(msg))
    } else {
        // Connection refused/reset, timeouts, truncated bodies: worth another try.
        Failure::transient(Error::io(msg))
    }
}

pub(crate) fn status_failure(status: StatusCode) -> Failure {
    let code = status.as_u16();
    let text = format!("HTTP {status}");
    match code {
        404 | 410 => Failure::fatal(Error::new(ErrorKind::NotFound, format!("not found ({text})"))),
        401 | 403 => Failure::fatal(Error::io(format!("access denied ({text})"))),
        408 | 429 | 500..=599 => Failure::transient(Error::io(format!("server error ({text})"))),
        _ => Failure::fatal(Error::io(format!("unexpected response ({text})"))),
    }
}

impl HttpFetch {
    fn request(&self, offset: u64, len: u64) -> reqwest::RequestBuilder {
        let mut req = self.client.get(self.url.clone()).headers(self.headers.clone());
        if self.ranges {
            req = req.header(RANGE, format!("bytes={offset}-{}", offset + len - 1));
        }
        if let Some((name, value)) = self.validator.condition() {
            req = req.header(name, value);
        }
        req
    }

    /// The first request: learn the size, whether ranges work and the validators, and keep the
    /// first bytes (the header and usually the whole index).
    async fn probe_once(&mut self, progress: &Progress) -> Result<Opened, Failure> {
        let resp = self
            .client
            .get(self.url.clone())
            .headers(self.headers.clone())
            .header(RANGE, format!("bytes=0-{}", PROBE_LEN - 1))
            .send()
            .await
            .map_err(request_failure)?;
        let status = resp.status();
        let h1 = matches!(resp.version(), reqwest::Version::HTTP_10 | reqwest::Version::HTTP_11);
        if resp.url() != &self.url || status != StatusCode::PARTIAL_CONTENT || !h1 {
            self.direct = None; // redirected, no ranges or not HTTP/1.x: reqwest handles it all
        }
        self.validator = Validator::from_headers(resp.headers());
        let content_range =
            resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(ContentRange::parse);
        let (size, ranges) = match status {
            StatusCode::PARTIAL_CONTENT => match content_range {
                Some(ContentRange { range: Some(_), total: Some(total) }) => (total, true),
                _ => {
                    return Err(Failure::fatal(Error::io("the server sent a partial response without its total size")))
                }
            },
            StatusCode::OK => {
                let len = resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                match len {
                    Some(len) => (len, false),
                    None => {
                        return Err(Failure::fatal(Error::io("the server reported neither a size nor Range support")))
                    }
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => match content_range {
                // Only an empty object has no byte 0.
                Some(ContentRange { range: None, total: Some(0) }) => (0, true),
                _ => return Err(status_failure(status)),
            },
            _ => return Err(status_failure(status)),
        };
        self.size = size;
        self.ranges = ranges;
        let mut prefix = vec![0u8; size.min(PROBE_LEN) as usize];
        let mut done = prefix.is_empty();
        let len = prefix.len();
        let mut filler = Filler::new(Out::Buf(&mut prefix), len, progress, 0, true);
        let mut resp = resp;
        while !done {
            match resp.chunk().await.map_err(request_failure)? {
                Some(chunk) => done = filler.push(&chunk)?,
                None => break,
            }
        }
        filler.finish()?;
        Ok(Opened { size, prefix, ranges })
    }
}

impl RangeFetch for HttpFetch {
    fn reads_into_buffers(&self) -> bool {
        self.direct.is_some() && self.ranges
    }

    fn pins_version(&self) -> bool {
        self.validator.condition().is_some()
    }

    fn probe<'a>(&'a mut self, progress: &'a Progress) -> BoxFuture<'a, Result<Opened, Failure>> {
        Box::pin(self.probe_once(progress))
    }

    fn fetch<'a>(
        &'a self,
        offset: u64,
        len: usize,
        out: Out<'a>,
        progress: &'a Progress,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let mut out = out;
            if let (Some(direct), Out::Dest(dest, stop)) = (&self.direct, &mut out) {
                // Streamed reads run on the caller's thread (see `read_stream_into`): the
                // socket reads may block it.
                let mut headers = self.headers.clone();
                if let Some((name, value)) = self.validator.condition() {
                    headers.insert(name, value);
                }
                let check = |h: &HeaderMap| self.validator.check(h);
                if let Outcome::Done =
                    direct.fetch(offset, len, self.size, &headers, &check, &mut **dest, stop, progress)?
                {
                    return Ok(());
                }
            }
            let mut resp = self.request(offset, len as u64).send().await.map_err(request_failure)?;
            let status = resp.status();
            let skip = match status {
                StatusCode::PARTIAL_CONTENT => {
                    ContentRange::check(
                        resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()),
                        offset,
                        self.size,
                    )?;
                    0
                }
                // The whole object: take our slice of it.
                StatusCode::OK => {
                    let len: Option<u64> =
                        resp.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
                    if let Some(len) = len.filter(|&l| l != self.size) {
                        return Err(changed(&format!("size {} became {len}", self.size)));
                    }
                    offset
                }
                StatusCode::PRECONDITION_FAILED => return Err(changed("the server refused the version seen at open")),
                StatusCode::RANGE_NOT_SATISFIABLE => return Err(changed("the requested range no longer exists")),
                _ => return Err(status_failure(status)),
            };
            self.validator.check(resp.headers())?;
            let mut filler = Filler::new(out, len, progress, skip, status == StatusCode::OK);
            while let Some(chunk) = resp.chunk().await.map_err(request_failure)? {
                if filler.push(&chunk)? {
                    return Ok(());
                }
            }
            filler.finish()
        })
    }
}

fn header_map(opts: &StorageOptions) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    // Content codings would break byte offsets.
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    for (name, value) in &opts.http_headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Error::value(format!("invalid HTTP header name {name:?}")))?;
        let mut value =
            HeaderValue::from_str(value).map_err(|_| Error::value(format!("invalid value for HTTP header {name}")))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(headers)
}

/// Open an `http://` or `https://` URL for ranged reads.
pub(crate) fn open(uri: &str, opts: &StorageOptions, stop: &super::Stop) -> Result<HttpSource> {
    let url = Url::parse(uri).map_err(|e| Error::value(format!("invalid URL: {e}")))?;
    let shown = shown_url(&url);
    let trust = tls::http_trust(opts, &|k| std::env::var(k).ok());
    let env = |k: &str| std::env::var(k).ok();
    let client = client(&trust, !opts.http_headers.is_empty()).map_err(|e| e.in_file(&shown))?;
    let direct = if opts.http_direct == Some(false) {
        None
    } else {
        // reqwest's own configuration (cached): the direct client trusts exactly what it does.
        let tls = (url.scheme() == "https").then(|| tls::client_config(&trust)).transpose();
        Direct::new(&url, &env, tls.map_err(|e| e.in_file(&shown))?)
    };
    let fetch = HttpFetch {
        client,
        direct,
        url,
        headers: header_map(opts).map_err(|e| e.in_file(&shown))?,
        validator: Validator::default(),
        size: 0,
        ranges: true,
    };
    RangedSource::open(fetch, shown, opts, stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_url_hides_credentials_and_signatures() {
        let url = Url::parse("https://user:pw@example.com:8443/a/b.tensors?X-Amz-Signature=abc").unwrap();
        assert_eq!(shown_url(&url), "https://example.com:8443/a/b.tensors?…");
        let url = Url::parse("http://example.com/x").unwrap();
        assert_eq!(shown_url(&url), "http://example.com/x");
    }

    #[test]
    fn conditions_prefer_strong_etags() {
        let mut h = HeaderMap::new();
        h.insert(ETAG, HeaderValue::from_static("W/\"x\""));
        h.insert(LAST_MODIFIED, HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"));
        assert_eq!(Validator::from_headers(&h).condition().unwrap().0, IF_UNMODIFIED_SINCE);
        h.insert(ETAG, HeaderValue::from_static("\"x\""));
        let v = Validator::from_headers(&h);
        assert_eq!(v.condition().unwrap().0, IF_MATCH);
        assert!(v.check(&h).is_ok());
        h.insert(ETAG, HeaderValue::from_static("\"y\""));
        assert!(v.check(&h).unwrap_err().error.message.contains("changed"));
    }
}
