//! `s3://bucket/key` sources and sinks with the AWS SDK: AWS or any S3-compatible server,
//! path-style addressing for custom endpoints, anonymous access for public buckets.
//!
//! Reads are parallel ranged GETs pinned to the ETag seen at open (`If-Match`, and compared on
//! every response). Writes stream as a multipart upload: part 1 (the header and index, rewritten
//! at the end) stays in memory and goes up last; later parts go up as soon as they are filled.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::Credentials;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::config::{resolve_s3, wants_path_style, S3Credentials, S3Settings, MIN_PART_SIZE};
use super::ranged::{
    changed, error_chain, ContentRange, Filler, Opened, Out, Progress, RangeFetch, RangedSource, PROBE_LEN,
};
use super::retry::{block_on, runtime, Backoff, Failure, RetryPolicy};
use super::tls::{self, Trust};
use super::{Sink, Stop, StorageOptions};
use crate::error::{Error, ErrorKind, Result};

pub(crate) type S3Source = RangedSource<S3Fetch>;

/// `s3://bucket/key` split; the key may contain `/`.
pub(crate) fn parse_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or(uri);
    match rest.split_once('/') {
        Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => Ok((bucket.to_string(), key.to_string())),
        _ => Err(Error::value(format!("invalid S3 URI {uri:?}: expected s3://bucket/key"))),
    }
}

/// The S3 error for one failed call, as a retry decision; the message names the code and what
/// S3 said, never a credential.
fn failure<E>(err: SdkError<E, HttpResponse>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let region_hint = err
        .raw_response()
        .and_then(|r| r.headers().get("x-amz-bucket-region"))
        .map(|r| format!("; the bucket is in region {r}, pass it as s3_region"))
        .unwrap_or_default();
    match err {
        SdkError::ServiceError(ctx) => {
            let e = ctx.err();
            let code = e.code().unwrap_or("");
            let detail = match (e.code(), e.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                (None, Some(m)) => m.to_string(),
                (None, None) => format!("HTTP {}: {}", status.unwrap_or(0), error_chain(e)),
            };
            let status = status.unwrap_or(0);
            if status == 404 || matches!(code, "NoSuchKey" | "NoSuchBucket" | "NotFound") {
                let what = if code == "NoSuchBucket" { "bucket not found" } else { "object not found" };
                Failure::fatal(Error::new(ErrorKind::NotFound, format!("{what} ({detail})")))
            } else if status == 403
                || matches!(
                    code,
                    "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "InvalidToken"
                )
            {
                Failure::fatal(Error::io(format!("access denied ({detail})")))
            } else if status == 412 {
                changed("S3 refused the ETag seen at open")
            } else if matches!(status, 301 | 307)
                || matches!(code, "PermanentRedirect" | "AuthorizationHeaderMalformed")
            {
                Failure::fatal(Error::io(format!("wrong region or endpoint ({detail}){region_hint}")))
            } else if status >= 500
                || matches!(status, 408 | 429)
                || matches!(
                    code,
                    "SlowDown"
                        | "RequestTimeout"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "Throttling"
                        | "ThrottlingException"
                )
            {
                Failure::transient(Error::io(format!("S3 server error ({detail})")))
            } else {
                Failure::fatal(Error::io(format!("S3 request failed ({detail}, HTTP {status})")))
            }
        }
        SdkError::ConstructionFailure(_) => {
            Failure::fatal(Error::io(format!("cannot build the S3 request: {}", error_chain(&err))))
        }
        // A certificate the client does not trust: another try would fail the same way.
        _ if tls::certificate_error(&err).is_some() => Failure::fatal(Error::io(format!(
            "S3 request failed: {}",
            tls::certificate_error(&err).unwrap_or_default()
        ))),
        // Timeouts, connection failures, unparseable responses: worth another try.
        _ => Failure::transient(Error::io(format!("S3 request failed: {}", error_chain(&err)))),
    }
}

/// Run one S3 call with retries.
async fn with_retries<T, Fut>(policy: RetryPolicy, mut call: impl FnMut() -> Fut) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let mut backoff = Backoff::new(policy);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(f) => backoff.wait(f).await?,
        }
    }
}

/// The HTTP client (rustls + ring) shared by every S3 client with the same trusted roots, and by
/// their credential providers (STS, IMDS, ECS).
fn http_client(trust: &Trust) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient> {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider, TlsContext, TrustStore};
    use aws_smithy_runtime_api::client::http::SharedHttpClient;
    static CLIENTS: OnceLock<Mutex<HashMap<Trust, SharedHttpClient>>> = OnceLock::new();
    let cache = CLIENTS.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap().get(trust) {
        return Ok(c.clone());
    }
    if *trust == Trust::Insecure {
        let client = super::s3_insecure::http_client()?;
        cache.lock().unwrap().insert(trust.clone(), client.clone());
        return Ok(client);
    }
    let mut builder = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring));
    if let Trust::Bundle(path) = trust {
        // Every certificate was checked as the SDK will parse it (it panics on bad ones).
        let mut store = TrustStore::empty();
        for (pem, _) in tls::load_bundle(path)? {
            store = store.with_pem_certificate(pem);
        }
        let ctx = TlsContext::builder()
            .with_trust_store(store)
            .build()
            .map_err(|e| Error::value(format!("CA bundle {}: {}", path.display(), error_chain(&e))))?;
        builder = builder.tls_context(ctx);
    }
    let client = builder.build_https();
    cache.lock().unwrap().insert(trust.clone(), client.clone());
    Ok(client)
}

async fn build_client(settings: &S3Settings) -> Result<Client> {
    let http_client = http_client(&settings.trust)?;
    let region = match &settings.region {
        Some(r) => Region::new(r.clone()),
        // Environment, then profile, then us-east-1; never instance metadata (slow off EC2).
        None => RegionProviderChain::first_try(aws_config::environment::EnvironmentVariableRegionProvider::new())
            .or_else(aws_config::profile::ProfileFileRegionProvider::new())
            .or_else(Region::from_static("us-east-1"))
            .region()
            .await
            .unwrap_or_else(|| Region::from_static("us-east-1")),
    };
    let loader = || {
        let mut l = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client.clone())
            .region(region.clone())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            )
            // Retries are ours (they also cover bodies that break off mid-stream).
            .retry_config(RetryConfig::disabled());
        if let Some(ep) = &settings.endpoint {
            l = l.endpoint_url(ep);
        }
        l
    };
    let sdk = match &settings.credentials {
        S3Credentials::Static { access_key_id, secret_access_key, session_token } => {
            let creds =
                Credentials::new(access_key_id, secret_access_key, session_token.clone(), None, "tensorizer-rs");
            loader().credentials_provider(creds).load().await
        }
        S3Credentials::Anonymous => loader().no_credentials().load().await,
        S3Credentials::AwsChain => {
            let sdk = loader().load().await;
            let found = match sdk.credentials_provider() {
                Some(p) => match p.provide_credentials().await {
                    Ok(_) => true,
                    Err(CredentialsError::CredentialsNotLoaded(_)) => false,
                    Err(e) => return Err(Error::io(format!("cannot load AWS credentials: {}", error_chain(&e)))),
                },
                None => false,
            };
            if found {
                sdk
            } else {
                // Nothing configured anywhere: unsigned requests, which suit public buckets.
                loader().no_credentials().load().await
            }
        }
    };
    let endpoint = settings.endpoint.clone().or_else(|| sdk.endpoint_url().map(str::to_string));
    let conf = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(endpoint.as_deref().is_some_and(wants_path_style))
        // S3-compatible servers often reject the newer default checksum headers and trailers.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Ok(Client::from_conf(conf))
}

/// One client per distinct settings, for the whole process: credentials are resolved (and the
/// AWS chain probed) once, and connections are pooled.
fn client_for(opts: &StorageOptions, stop: &Stop) -> Result<Client> {
    static CLIENTS: OnceLock<Mutex<HashMap<[u8; 32], Client>>> = OnceLock::new();
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let settings = resolve_s3(opts, &|k| std::env::var(k).ok(), home.as_deref())?;
    // The cache key is a digest, so secrets are not kept around as map keys.
    let mut h = Sha256::new();
    match &settings.credentials {
        S3Credentials::Static { access_key_id, secret_access_key, session_token } => {
            for part in
                [access_key_id.as_str(), secret_access_key.as_str(), session_token.as_deref().unwrap_or("\0none")]
            {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
        }
        other => h.update(format!("{other:?}")),
    }
    h.update(format!("{:?}|{:?}|{:?}", settings.endpoint, settings.region, settings.trust));
    let key: [u8; 32] = h.finalize().into();
    let cache = CLIENTS.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap().get(&key) {
        return Ok(c.clone());
    }
    // Finding credentials may wait on the network (AWS chain): give up when the caller stops.
    let client = super::retry::block_on_read(build_client(&settings), stop)?;
    cache.lock().unwrap().insert(key, client.clone());
    Ok(client)
}

pub struct S3Fetch {
    client: Client,
    bucket: String,
    key: String,
    etag: Option<String>,
    size: u64,
}

impl S3Fetch {
    /// The first GET: size, ETag and the first bytes.
    async fn probe_once(&mut self, progress: &Progress) -> Result<Opened, Failure> {
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .range(format!("bytes=0-{}", PROBE_LEN - 1))
            .send()
            .await;
        let out = match resp {
            Ok(out) => out,
            // An empty object has no byte 0.
            Err(SdkError::ServiceError(ctx)) if ctx.raw().status().as_u16() == 416 => {
                let head =
                    self.client.head_object().bucket(&self.bucket).key(&self.key).send().await.map_err(failure)?;
                self.etag = head.e_tag().map(str::to_string);
                self.size = head.content_length().unwrap_or(0).max(0) as u64;
                return Ok(Opened { size: self.size, prefix: Vec::new(), ranges: true });
            }
            Err(e) => return Err(failure(e)),
        };
        self.etag = out.e_tag().map(str::to_string);
        let range = out.content_range().and_then(ContentRange::parse);
        let (size, ranges) = match range {
            Some(ContentRange { range: Some(_), total: Some(total) }) => (total, true),
            // The server ignored Range and sent the whole object.
            _ => (out.content_length().unwrap_or(0).max(0) as u64, false),
        };
        self.size = size;
        let mut prefix = vec![0u8; size.min(PROBE_LEN) as usize];
        let mut done = prefix.is_empty();
        let len = prefix.len();
        let mut filler = Filler::new(Out::Buf(&mut prefix), len, progress, 0, true);
        let mut body = out.body;
        while !done {
            match body.try_next().await.map_err(|e| Failure::transient(Error::io(error_chain(&e))))? {
                Some(chunk) => done = filler.push(&chunk)?,
                None => break,
            }
        }
        filler.finish()?;
        Ok(Opened { size, prefix, ranges })
    }
}

impl RangeFetch for S3Fetch {
    fn pins_version(&self) -> bool {
        self.etag.as_deref().is_some_and(|e| !e.starts_with("W/"))
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
            let end = offset + len as u64 - 1;
            let mut req =
                self.client.get_object().bucket(&self.bucket).key(&self.key).range(format!("bytes={offset}-{end}"));
            if let Some(etag) = &self.etag {
                req = req.if_match(etag);
            }
            let resp = req.send().await.map_err(failure)?;
            if let (Some(a), Some(b)) = (&self.etag, resp.e_tag()) {
                if a != b {
                    return Err(changed(&format!("ETag {a} became {b}")));
                }
            }
            // Without Content-Range the server sent the whole object: take our slice of it.
            let skip = match resp.content_range() {
                Some(header) => {
                    ContentRange::check(Some(header), offset, self.size)?;
                    0
                }
                None => offset,
            };
            let whole_object = resp.content_range().is_none();
            let mut filler = Filler::new(out, len, progress, skip, whole_object);
            let mut body = resp.body;
            while let Some(chunk) = body.try_next().await.map_err(|e| Failure::transient(Error::io(error_chain(&e))))? {
                if filler.push(&chunk)? {
                    return Ok(());
                }
            }
            filler.finish()
        })
    }
}

/// Open `s3://bucket/key` for ranged reads.
pub(crate) fn open(uri: &str, opts: &StorageOptions, stop: &Stop) -> Result<S3Source> {
    let (bucket, key) = parse_uri(uri)?;
    let shown = format!("s3://{bucket}/{key}");
    let client = client_for(opts, stop).map_err(|e| e.in_file(&shown))?;
    let fetch = S3Fetch { client, bucket, key, etag: None, size: 0 };
    RangedSource::open(fetch, shown, opts, stop)
}

// ------------------------------------------------------------------------------------------------
// Abandoned multipart uploads
// ------------------------------------------------------------------------------------------------

/// A multipart upload that was started and neither completed nor aborted: a writer that was
/// killed, or cut off from the server before it could abort (S3 keeps its parts, and bills
/// them, until the upload is aborted or a lifecycle rule removes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// `s3://bucket/key` of the object being uploaded.
    pub uri: String,
    pub upload_id: String,
    /// When it was started, in seconds since the Unix epoch, where the server says.
    pub initiated: Option<i64>,
}

/// `s3://bucket[/prefix]` split; the prefix may be empty.
fn parse_prefix(uri: &str) -> Result<(String, String)> {
    let rest = uri.strip_prefix("s3://").or_else(|| uri.strip_prefix("S3://")).unwrap_or(uri);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(Error::value(format!("invalid S3 URI {uri:?}: expected s3://bucket[/prefix]")));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// The pending multipart uploads of keys under `s3://bucket/prefix`; gives up once `stop` is set.
pub fn pending_uploads(uri: &str, opts: &StorageOptions, stop: &Stop) -> Result<Vec<PendingUpload>> {
    let (bucket, prefix) = parse_prefix(uri)?;
    let client = client_for(opts, stop).map_err(|e| e.in_file(uri))?;
    let retry = opts.retry_policy();
    super::retry::block_on_read(
        async {
            let mut out = Vec::new();
            let mut markers: (Option<String>, Option<String>) = (None, None);
            loop {
                let page = with_retries(retry, || async {
                    client
                        .list_multipart_uploads()
                        .bucket(&bucket)
                        .prefix(&prefix)
                        .set_key_marker(markers.0.clone())
                        .set_upload_id_marker(markers.1.clone())
                        .send()
                        .await
                        .map_err(failure)
                })
                .await?;
                for u in page.uploads() {
                    if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                        let initiated = u.initiated().map(|t| t.secs());
                        out.push(PendingUpload {
                            uri: format!("s3://{bucket}/{key}"),
                            upload_id: id.to_string(),
                            initiated,
                        });
                    }
                }
                let next =
                    (page.next_key_marker().map(str::to_string), page.next_upload_id_marker().map(str::to_string));
                if !page.is_truncated().unwrap_or(false) || next.0.is_none() || next == markers {
                    return Ok(out);
                }
                markers = next;
            }
        },
        stop,
    )
    .map_err(|e: Error| e.in_file(uri))
}

/// Abort the multipart upload `upload_id` of `s3://bucket/key`: its parts are deleted. Gives
/// up once `stop` is set.
pub fn abort_upload(uri: &str, upload_id: &str, opts: &StorageOptions, stop: &Stop) -> Result<()> {
    let (bucket, key) = parse_uri(uri)?;
    let client = client_for(opts, stop).map_err(|e| e.in_file(uri))?;
    let abort = with_retries(opts.retry_policy(), || async {
        client
            .abort_multipart_upload()
            .bucket(&bucket)
            .key(&key)
            .upload_id(upload_id)
            .send()
            .await
            .map(|_| ())
            .map_err(failure)
    });
    super::retry::block_on_read(abort, stop).map_err(|e| e.in_file(uri))
}

// ------------------------------------------------------------------------------------------------
// Writes
// ------------------------------------------------------------------------------------------------

/// Parts after part 1: 1000 parts of `part_size`, then 1000 of twice that, and so on, so any
/// object up to 511,000 × `part_size` (3.9 TiB with 8 MiB parts) fits in S3's 10,000 parts
/// without knowing its size first.
const PARTS_PER_TIER: u64 = 1000;
const TIERS: u32 = 9;
/// Concurrent UploadPart calls per sink.
const UPLOAD_SLOTS: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Part 1 is `[0, boundary)`.
    boundary: u64,
    part_size: u64,
}

impl Layout {
    /// The part holding byte `offset >= boundary`: (part number, its start, its full length).
    fn locate(&self, offset: u64) -> Result<(u32, u64, u64)> {
        let mut rel = offset - self.boundary;
        let mut tier_start = self.boundary;
        for tier in 0..TIERS {
            let len = self.part_size << tier;
            let tier_bytes = len * PARTS_PER_TIER;
            if rel < tier_bytes {
                let i = rel / len;
                return Ok((2 + tier * PARTS_PER_TIER as u32 + i as u32, tier_start + i * len, len));
            }
            rel -= tier_bytes;
            tier_start += tier_bytes;
        }
        Err(Error::new(ErrorKind::Unsupported, "object too large for one S3 multipart upload; raise s3_part_size"))
    }
}

/// A part being filled: its bytes and which ranges of them were written.
struct PartBuf {
    start: u64,
    data: Vec<u8>,
    /// Written ranges relative to `start`, sorted and merged.
    written: Vec<(usize, usize)>,
}

impl PartBuf {
    fn mark(&mut self, from: usize, to: usize) {
        self.written.push((from, to));
        self.written.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.written.len());
        for &(a, b) in &self.written {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.written = merged;
    }
    fn is_full(&self) -> bool {
        self.written == [(0, self.data.len())]
    }
}

#[derive(Default)]
struct SinkState {
    layout: Option<Layout>,
    /// Part 1, kept until `finish` because the header is rewritten last.
    head: Vec<u8>,
    parts: BTreeMap<u32, PartBuf>,
    /// Parts handed to an upload task (running or done).
    started: HashSet<u32>,
    completed: Vec<(u32, String)>,
    uploading: usize,
    /// Bytes of parts held in memory (filling or uploading), part 1 excluded.
    buffered: usize,
    /// One past the highest byte written: the object's size.
    end: u64,
    error: Option<Error>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct SinkShared {
    client: Client,
    bucket: String,
    key: String,
    shown: String,
    retry: RetryPolicy,
    budget: usize,
    upload_id: tokio::sync::OnceCell<String>,
    /// Set by `abort`: part uploads not yet sent are skipped.
    cancelled: AtomicBool,
    slots: tokio::sync::Semaphore,
    state: Mutex<SinkState>,
    /// Signalled whenever an upload ends (memory freed, or an error to report).
    upload_done: Condvar,
}

impl SinkShared {
    async fn upload_id(&self) -> Result<String> {
        self.upload_id
            .get_or_try_init(|| {
                with_retries(self.retry, || async {
                    let out = self
                        .client
                        .create_multipart_upload()
                        .bucket(&self.bucket)
                        .key(&self.key)
                        .send()
                        .await
                        .map_err(failure)?;
                    out.upload_id()
                        .map(str::to_string)
                        .ok_or_else(|| Failure::fatal(Error::io("S3 returned no upload id")))
                })
            })
            .await
            .cloned()
    }

    async fn upload_part(&self, number: u32, body: bytes::Bytes) -> Result<String> {
        let _slot = self.slots.acquire().await.map_err(|_| Error::io("upload closed"))?;
        let cancelled = || Error::io("the upload was abandoned");
        if self.cancelled.load(Ordering::Acquire) {
            return Err(cancelled());
        }
        let upload_id = self.upload_id().await?;
        if self.cancelled.load(Ordering::Acquire) {
            return Err(cancelled());
        }
        with_retries(self.retry, || async {
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&upload_id)
                .part_number(number as i32)
                .content_length(body.len() as i64)
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .map_err(failure)?;
            out.e_tag().map(str::to_string).ok_or_else(|| Failure::fatal(Error::io("S3 returned no ETag for a part")))
        })
        .await
    }

    /// Hand a part to an upload task. Its bytes stay counted in `buffered` until it is done.
    fn spawn_upload(self: &Arc<Self>, st: &mut SinkState, number: u32, data: Vec<u8>, counted: usize) {
        st.started.insert(number);
        st.uploading += 1;
        let shared = Arc::clone(self);
        let task = runtime().spawn(async move {
            let result = shared.upload_part(number, bytes::Bytes::from(data)).await;
            let mut st = shared.state.lock().unwrap();
            st.uploading -= 1;
            st.buffered -= counted;
            match result {
                Ok(etag) => st.completed.push((number, etag)),
                Err(e) => {
                    st.error.get_or_insert(e.in_file(&shared.shown));
                }
            }
            drop(st);
            shared.upload_done.notify_all();
        });
        st.tasks.push(task);
    }

    /// Stop every upload and abort the multipart upload, so nothing stays under the key.
    ///
    /// Part uploads already sent are let finish rather than cancelled: a cancelled task could be
    /// the one creating the multipart upload, which would then stay behind unseen. Once no task
    /// runs, no part can complete after the abort.
    fn abort(&self) -> Result<()> {
        self.cancelled.store(true, Ordering::Release);
        let tasks = std::mem::take(&mut self.state.lock().unwrap().tasks);
        block_on(async {
            for t in tasks {
                let _ = t.await;
            }
            if let Some(id) = self.upload_id.get() {
                with_retries(self.retry, || async {
                    match self
                        .client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(&self.key)
                        .upload_id(id)
                        .send()
                        .await
                    {
                        Ok(_) => Ok(()),
                        // Already gone.
                        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
                        Err(e) => Err(failure(e)),
                    }
                })
                .await?;
            }
            Ok(())
        })
        .map_err(|e: Error| e.in_file(&self.shown))
    }
}

/// An S3 object being written; see the module notes. Dropping it without `finish` aborts the upload.
pub struct S3Sink {
    shared: Arc<SinkShared>,
    done: bool,
}

/// Create (on `finish`) `s3://bucket/key`.
pub(crate) fn create(uri: &str, opts: &StorageOptions, stop: &Stop) -> Result<S3Sink> {
    let (bucket, key) = parse_uri(uri)?;
    let shown = format!("s3://{bucket}/{key}");
    let part_size = opts.s3_part_size.unwrap_or(super::config::DEFAULT_PART_SIZE);
    if part_size < MIN_PART_SIZE {
        return Err(Error::value(format!(
            "s3_part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum part size)"
        ))
        .in_file(&shown));
    }
    let client = client_for(opts, stop).map_err(|e| e.in_file(&shown))?;
    let state = SinkState {
        layout: Some(Layout { boundary: part_size as u64, part_size: part_size as u64 }),
        ..Default::default()
    };
    Ok(S3Sink {
        shared: Arc::new(SinkShared {
            client,
            bucket,
            key,
            shown,
            retry: opts.retry_policy(),
            budget: opts.s3_upload_buffer.unwrap_or(super::config::DEFAULT_UPLOAD_BUFFER),
            upload_id: tokio::sync::OnceCell::new(),
            cancelled: AtomicBool::new(false),
            slots: tokio::sync::Semaphore::new(UPLOAD_SLOTS),
            state: Mutex::new(state),
            upload_done: Condvar::new(),
        }),
        done: false,
    })
}

impl S3Sink {
    fn layout(st: &SinkState) -> Layout {
        st.layout.expect("layout is set at creation")
    }

    fn complete(&self) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap();
        if let Some(e) = st.error.clone() {
            return Err(e);
        }
        let layout = Self::layout(&st);
        let total = st.end;
        if st.parts.is_empty() && st.started.is_empty() {
            // Small object: one PUT, no multipart upload.
            let mut body = std::mem::take(&mut st.head);
            body.resize(total as usize, 0);
            drop(st);
            let body = bytes::Bytes::from(body);
            return block_on(with_retries(sh.retry, || async {
                sh.client
                    .put_object()
                    .bucket(&sh.bucket)
                    .key(&sh.key)
                    .content_length(body.len() as i64)
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(failure)
            }))
            .map_err(|e| e.in_file(&sh.shown));
        }
        // Never-written gaps read back as zeros, as in a sparse local file.
        let (last, _, _) = layout.locate(total - 1)?;
        let mut at = layout.boundary;
        loop {
            let (number, start, len) = layout.locate(at)?;
            if !st.started.contains(&number) && !st.parts.contains_key(&number) {
                st.parts.insert(number, PartBuf { start, data: vec![0; len as usize], written: Vec::new() });
                st.buffered += len as usize;
            }
            if number == last {
                break;
            }
            at = start + len;
        }
        let parts = std::mem::take(&mut st.parts);
        for (number, mut part) in parts {
            let counted = part.data.len();
            part.data.truncate((total - part.start).min(part.data.len() as u64) as usize);
            sh.spawn_upload(&mut st, number, part.data, counted);
        }
        let mut head = std::mem::take(&mut st.head);
        head.resize(layout.boundary as usize, 0);
        sh.spawn_upload(&mut st, 1, head, 0);
        while st.uploading > 0 {
            st = sh.upload_done.wait(st).unwrap();
        }
        if let Some(e) = st.error.clone() {
            return Err(e);
        }
        let mut completed = std::mem::take(&mut st.completed);
        drop(st);
        completed.sort_unstable();
        let parts: Vec<CompletedPart> = completed
            .into_iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(n as i32).e_tag(etag).build())
            .collect();
        let upload = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        block_on(async {
            let upload_id = sh.upload_id().await?;
            with_retries(sh.retry, || async {
                sh.client
                    .complete_multipart_upload()
                    .bucket(&sh.bucket)
                    .key(&sh.key)
                    .upload_id(&upload_id)
                    .multipart_upload(upload.clone())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(failure)
            })
            .await
        })
        .map_err(|e| e.in_file(&sh.shown))
    }
}

impl Sink for S3Sink {
    fn describe(&self) -> &str {
        &self.shared.shown
    }

    fn set_header_len(&self, len: u64) -> Result<()> {
        let mut st = self.shared.state.lock().unwrap();
        let mut layout = Self::layout(&st);
        if len <= layout.boundary {
            return Ok(());
        }
        if !st.parts.is_empty() || !st.started.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the header length must be set before data beyond it is written",
            )
            .in_file(&self.shared.shown));
        }
        layout.boundary = len;
        st.layout = Some(layout);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let sh = &self.shared;
        let end = offset.checked_add(data.len() as u64).ok_or_else(|| Error::value("write offset overflows"))?;
        let mut st = sh.state.lock().unwrap();
        if let Some(e) = &st.error {
            return Err(e.clone());
        }
        let layout = Self::layout(&st);
        let mut at = offset;
        while at < end {
            let rest = &data[(at - offset) as usize..];
            if at < layout.boundary {
                let n = (layout.boundary - at).min(rest.len() as u64) as usize;
                if st.head.len() < (at as usize + n) {
                    st.head.resize(at as usize + n, 0);
                }
                st.head[at as usize..at as usize + n].copy_from_slice(&rest[..n]);
                at += n as u64;
                continue;
            }
            let (number, start, len) = layout.locate(at)?;
            if st.started.contains(&number) {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "bytes at offset {at} were already uploaded; only [0, {}) can be rewritten in an S3 object",
                        layout.boundary
                    ),
                )
                .in_file(&sh.shown));
            }
            if !st.parts.contains_key(&number) {
                // Bound memory: wait while uploads (which will free some) are running, then look
                // again (another writer may have created or even uploaded this part meanwhile).
                if st.uploading > 0 && st.buffered + len as usize > sh.budget {
                    st = sh.upload_done.wait(st).unwrap();
                    if let Some(e) = &st.error {
                        return Err(e.clone());
                    }
                    continue;
                }
                st.parts.insert(number, PartBuf { start, data: vec![0; len as usize], written: Vec::new() });
                st.buffered += len as usize;
            }
            let part = st.parts.get_mut(&number).expect("inserted above");
            let from = (at - start) as usize;
            let n = (len as usize - from).min(rest.len());
            part.data[from..from + n].copy_from_slice(&rest[..n]);
            part.mark(from, from + n);
            if part.is_full() {
                let part = st.parts.remove(&number).expect("present");
                let counted = part.data.len();
                sh.spawn_upload(&mut st, number, part.data, counted);
            }
            at += n as u64;
        }
        st.end = st.end.max(end);
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let result = self.complete();
        self.done = true;
        if let Err(e) = result {
            // Leave nothing behind; the first error is the one worth reporting.
            let _ = self.shared.abort();
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for S3Sink {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.shared.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_uris() {
        assert_eq!(parse_uri("s3://b/k/x.tensors").unwrap(), ("b".into(), "k/x.tensors".into()));
        assert!(parse_uri("s3://b").is_err());
        assert!(parse_uri("s3:///k").is_err());
        assert!(parse_uri("s3://b/").is_err());
        assert_eq!(parse_prefix("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_prefix("s3://b/m/x").unwrap(), ("b".into(), "m/x".into()));
        assert!(parse_prefix("s3:///m").is_err());
    }

    #[test]
    fn layout_tiers_are_contiguous_and_fit_s3_limits() {
        let l = Layout { boundary: 8 << 20, part_size: 8 << 20 };
        assert_eq!(l.locate(8 << 20).unwrap(), (2, 8 << 20, 8 << 20));
        assert_eq!(l.locate((16 << 20) - 1).unwrap(), (2, 8 << 20, 8 << 20));
        assert_eq!(l.locate(16 << 20).unwrap(), (3, 16 << 20, 8 << 20));
        let mut at = l.boundary;
        let mut expected = 2;
        let mut last = (0, 0, 0);
        while let Ok(p) = l.locate(at) {
            assert_eq!(p.0, expected);
            assert_eq!(p.1, at);
            assert!(p.2 <= 5 << 30, "parts stay under S3's 5 GiB limit");
            expected += 1;
            at += p.2;
            last = p;
        }
        assert!(last.0 <= 10_000);
        assert!(at > 3 << 40, "objects of several TiB fit");
    }

    #[test]
    fn part_coverage_merges_overlaps() {
        let mut p = PartBuf { start: 0, data: vec![0; 10], written: Vec::new() };
        p.mark(5, 10);
        assert!(!p.is_full());
        p.mark(0, 3);
        p.mark(2, 6);
        assert!(p.is_full());
    }
}
