//! The read side shared by HTTP and S3: a `read_at` is cut into ranged requests that run
//! concurrently (bounded per source), each retried and resumed where it stopped, each writing
//! straight into its slice of the caller's buffer.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{select, select_all, BoxFuture, Either};
use tokio::sync::Semaphore;

use super::retry::{block_on, block_on_read, runtime, Backoff, Failure, RetryPolicy};
use super::{Caps, Source, Stop, StreamDest};
use crate::error::{Error, Result};

/// One backend's way of fetching a byte range, once (no retries).
pub(crate) trait RangeFetch: Send + Sync + 'static {
    /// The first request, once (no retries): learn the size, whether ranges work and what
    /// identifies this version of the object, and keep the first `PROBE_LEN` bytes, counting
    /// them in `progress`.
    fn probe<'a>(&'a mut self, progress: &'a Progress) -> BoxFuture<'a, Result<Opened, Failure>>;
    /// Fetch `[offset, offset + len)` into `out`, counting bytes in `progress` as they arrive
    /// so that a retry can resume after them (and a silent request is noticed). Must not
    /// deliver more than `len` bytes.
    fn fetch<'a>(
        &'a self,
        offset: u64,
        len: usize,
        out: Out<'a>,
        progress: &'a Progress,
    ) -> BoxFuture<'a, Result<(), Failure>>;
    /// Whether an `Out::Dest` fetch reads from the socket straight into the lent buffers.
    fn reads_into_buffers(&self) -> bool {
        false
    }
    /// Whether every response is checked against a strong validator seen by the probe (see
    /// [`super::Caps::pins_version`]).
    fn pins_version(&self) -> bool;
}

/// Where a response body goes.
pub(crate) enum Out<'a> {
    /// The caller's buffer, filled from its start.
    Buf(&'a mut [u8]),
    /// A callback that takes the bytes in order as they arrive; its error ends the read.
    Sink(&'a mut ByteSink<'a>),
    /// Buffers lent by the caller, filled in order (see [`StreamDest`]); its error ends the read.
    /// A fetch that blocks its thread (the direct HTTP client) gives up once `stop` is set.
    Dest(&'a mut dyn StreamDest, &'a Stop),
}

/// The callback of [`Source::read_stream`](super::Source::read_stream).
pub type ByteSink<'a> = dyn FnMut(&[u8]) -> Result<()> + Send + 'a;

impl Out<'_> {
    /// The same destination, minus the first `from` bytes (a retry's resume point).
    fn rest(&mut self, from: usize) -> Out<'_> {
        match self {
            Out::Buf(b) => Out::Buf(&mut b[from..]),
            Out::Sink(f) => Out::Sink(&mut **f),
            // The destination keeps its own place.
            Out::Dest(d, stop) => Out::Dest(&mut **d, stop),
        }
    }
}

/// What a backend learned when it opened the object.
pub(crate) struct Opened {
    pub size: u64,
    /// The first bytes of the object (the header and usually the index), fetched by the probe.
    pub prefix: Vec<u8>,
    /// Whether the server honours `Range`; if not, every read streams from offset 0.
    pub ranges: bool,
}

pub(crate) struct RangedSource<F> {
    requests: Arc<Requests<F>>,
    shown: String,
    size: u64,
    prefix: Vec<u8>,
    ranges: bool,
    request_size: usize,
    max_in_flight: usize,
}

/// What the request tasks share: the fetcher, the in-flight bound, the retry policy and the
/// source's flow of bytes.
struct Requests<F> {
    fetcher: F,
    in_flight: Semaphore,
    retry: RetryPolicy,
    flow: Arc<Flow>,
}

/// How often an attempt run on the network threads is checked for a stall.
const WATCH: Duration = Duration::from_millis(250);
/// A silent request is a stall, rather than a slow server, once the source's other requests
/// have received at least this much since its last byte.
const HEDGE_MIN_OTHERS: u64 = 1 << 20;

/// The bytes all requests of one source receive, against which one request's silence is
/// judged, and the limits on silence.
pub(crate) struct Flow {
    start: Instant,
    /// Bytes received by every request of the source so far.
    total: AtomicU64,
    stall_timeout: Duration,
    hedge_after: Option<Duration>,
}

impl Flow {
    pub fn new(opts: &super::StorageOptions) -> Arc<Self> {
        Arc::new(Flow {
            start: Instant::now(),
            total: AtomicU64::new(0),
            stall_timeout: opts.stall_timeout(),
            hedge_after: opts.hedge_after(),
        })
    }
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// One request's progress over its attempts: the bytes it delivered and when the last came.
pub(crate) struct Progress {
    flow: Arc<Flow>,
    filled: AtomicUsize,
    /// When this request last received a byte (or its attempt started), in `flow` time.
    last: AtomicU64,
    /// The source's `total` at that moment.
    total_then: AtomicU64,
    /// Bytes not yet added to the source's `total` (added in batches: one shared counter
    /// updated for every body chunk of every request would be a contended cache line).
    unreported: AtomicU64,
    /// Whether the current attempt ended by falling silent for the stall timeout.
    stalled: AtomicBool,
}

/// Bytes a request receives before it adds them to its source's total.
const REPORT_BATCH: u64 = 256 << 10;

impl Progress {
    pub fn new(flow: &Arc<Flow>) -> Self {
        let p = Progress {
            flow: Arc::clone(flow),
            filled: AtomicUsize::new(0),
            last: 0.into(),
            total_then: 0.into(),
            unreported: 0.into(),
            stalled: AtomicBool::new(false),
        };
        p.restart();
        p
    }
    /// Bytes delivered so far.
    pub fn filled(&self) -> usize {
        self.filled.load(Ordering::Relaxed)
    }
    /// `n` more bytes arrived.
    pub fn add(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.filled.fetch_add(n, Ordering::Relaxed);
        if self.unreported.fetch_add(n as u64, Ordering::Relaxed) + n as u64 >= REPORT_BATCH {
            let batch = self.unreported.swap(0, Ordering::Relaxed);
            self.flow.total.fetch_add(batch, Ordering::Relaxed);
        }
        self.total_then.store(self.flow.total.load(Ordering::Relaxed), Ordering::Relaxed);
        self.last.store(self.flow.now(), Ordering::Relaxed);
    }
    /// A new attempt starts: its silence counts from now.
    pub fn restart(&self) {
        self.stalled.store(false, Ordering::Relaxed);
        self.total_then.store(self.flow.total.load(Ordering::Relaxed), Ordering::Relaxed);
        self.last.store(self.flow.now(), Ordering::Relaxed);
    }
    /// Whether the current attempt should be dropped and sent again (a transient failure):
    /// silent for the stall timeout, or silent for `hedge_after` while the source's other
    /// requests kept receiving data (one stuck connection, not a slow server).
    pub fn verdict(&self) -> Result<(), Failure> {
        let silent = Duration::from_nanos(self.flow.now().saturating_sub(self.last.load(Ordering::Relaxed)));
        if silent >= self.flow.stall_timeout {
            self.stalled.store(true, Ordering::Relaxed);
            return Err(Failure::transient(Error::io(format!("no data for {} s", silent.as_secs()))));
        }
        if let Some(after) = self.flow.hedge_after {
            let others =
                self.flow.total.load(Ordering::Relaxed).saturating_sub(self.total_then.load(Ordering::Relaxed));
            if silent >= after && others >= HEDGE_MIN_OTHERS {
                HEDGED.fetch_add(1, Ordering::Relaxed);
                crate::trace::mark("request_hedged", self.filled() as u64, silent.as_millis() as u64);
                return Err(Failure::transient(Error::io(format!(
                    "no data for {:.1} s while the other requests received {} MiB: sent again on another connection",
                    silent.as_secs_f64(),
                    others >> 20
                ))));
            }
        }
        Ok(())
    }
}

/// Requests re-issued because they stalled while others flowed, process-wide (tests).
static HEDGED: AtomicU64 = AtomicU64::new(0);

pub fn hedged_requests() -> u64 {
    HEDGED.load(Ordering::Relaxed)
}

/// Run one attempt, checking every [`WATCH`] whether it has stalled (see
/// [`Progress::verdict`]); a stalled attempt is dropped, which closes its connection. Attempts
/// that block their thread (the direct HTTP path) check the verdict themselves.
async fn watched<T>(
    attempt: impl std::future::Future<Output = Result<T, Failure>>,
    progress: &Progress,
) -> Result<T, Failure> {
    let mut attempt = std::pin::pin!(attempt);
    let mut tick = tokio::time::interval(WATCH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        match select(attempt.as_mut(), std::pin::pin!(tick.tick())).await {
            Either::Left((done, _)) => return done,
            Either::Right(_) => progress.verdict()?,
        }
    }
}

/// A slice of the caller's buffer handed to a request task on the runtime.
struct BufPtr {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: each BufPtr covers a distinct part of a buffer that `RangedSource::read` keeps borrowed
// (and untouched) until every task holding one has finished (`Tasks` waits even on unwinding).
unsafe impl Send for BufPtr {}

/// Bytes the open probe asks for; covers the header and the index of most files.
pub(crate) const PROBE_LEN: u64 = 1 << 20;

impl<F: RangeFetch> RangedSource<F> {
    /// Probe the object (with retries) and wrap the fetcher; gives up once `stop` is set.
    pub fn open(mut fetcher: F, shown: String, opts: &super::StorageOptions, stop: &Stop) -> Result<Self> {
        let retry = opts.retry_policy();
        let flow = Flow::new(opts);
        // block_on_read: a caller that stops (Ctrl-C at the open) does not wait out a silent
        // server's timeouts and retries.
        let probe = async {
            let mut backoff = Backoff::new(retry);
            loop {
                let progress = Progress::new(&flow);
                match watched(fetcher.probe(&progress), &progress).await {
                    Ok(opened) => return Ok(opened),
                    Err(f) => backoff.wait(f).await?,
                }
            }
        };
        let opened = block_on_read(probe, stop).map_err(|e: Error| e.in_file(&shown))?;
        Ok(Self::new(fetcher, shown, opened, opts, flow))
    }

    fn new(fetcher: F, shown: String, opened: Opened, opts: &super::StorageOptions, flow: Arc<Flow>) -> Self {
        let max_in_flight = if opened.ranges { opts.max_concurrency() } else { 1 };
        RangedSource {
            requests: Arc::new(Requests {
                fetcher,
                in_flight: Semaphore::new(max_in_flight),
                retry: opts.retry_policy(),
                flow,
            }),
            shown,
            size: opened.size,
            prefix: opened.prefix,
            ranges: opened.ranges,
            request_size: if opened.ranges { opts.request_size() } else { usize::MAX },
            max_in_flight,
        }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        offset.checked_add(len as u64).filter(|&e| e <= self.size).map(|_| ()).ok_or_else(|| {
            Error::format(format!(
                "file is truncated: read of {len} bytes at offset {offset} runs past the end ({} bytes)",
                self.size
            ))
            .in_file(&self.shown)
        })
    }

    /// Fetch `buf`: one request runs on the calling thread; several run as tasks on the
    /// runtime's workers, concurrently, and the call waits for all of them.
    fn fetch_split(&self, offset: u64, buf: &mut [u8], stop: &Stop) -> Result<()> {
        if buf.len() <= self.request_size {
            let len = buf.len();
            return block_on_read(self.requests.fetch_with_retries(offset, len, Out::Buf(buf)), stop);
        }
        let mut tasks = Tasks(Vec::with_capacity(buf.len().div_ceil(self.request_size)));
        let mut at = offset;
        for chunk in buf.chunks_mut(self.request_size) {
            let dst = BufPtr { ptr: chunk.as_mut_ptr(), len: chunk.len() };
            let requests = Arc::clone(&self.requests);
            let start = at;
            at += chunk.len() as u64;
            tasks.0.push(runtime().spawn(async move {
                let dst = dst;
                // SAFETY: see `BufPtr`; the slices of different tasks do not overlap.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst.ptr, dst.len) };
                requests.fetch_with_retries(start, dst.len(), Out::Buf(dst)).await
            }));
        }
        // Stopped early, `tasks` cancels the requests left and waits for them as it drops.
        block_on_read(
            async {
                let mut result = Ok(());
                while !tasks.0.is_empty() {
                    let (joined, i, _) = select_all(tasks.0.iter_mut()).await;
                    tasks.0.swap_remove(i);
                    let outcome = match joined {
                        Ok(r) => r,
                        Err(e) if e.is_cancelled() => continue,
                        Err(e) => Err(Error::io(format!("a read task failed: {e}"))),
                    };
                    if let (Err(e), true) = (outcome, result.is_ok()) {
                        // The first failure cancels the other requests; they are still awaited.
                        result = Err(e);
                        tasks.0.iter().for_each(|t| t.abort());
                    }
                }
                result
            },
            stop,
        )
    }
}

/// Request tasks writing into a caller's buffer. Dropping the set with tasks left in it (only on
/// a panic) cancels them and waits until none can write any more, so the buffer outlives them.
struct Tasks(Vec<tokio::task::JoinHandle<Result<()>>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        let tasks = std::mem::take(&mut self.0);
        if !tasks.is_empty() {
            tasks.iter().for_each(|t| t.abort());
            block_on(async {
                for t in tasks {
                    let _ = t.await;
                }
            });
        }
    }
}

impl<F: RangeFetch> Requests<F> {
    /// One request's worth, with retries; a retry asks only for the bytes still missing. An
    /// attempt that stalls (see [`Progress::verdict`]) is dropped and sent again.
    async fn fetch_with_retries(&self, offset: u64, len: usize, mut out: Out<'_>) -> Result<()> {
        let _permit = self.in_flight.acquire().await.map_err(|_| Error::io("source closed"))?;
        let mut backoff = Backoff::new(self.retry);
        let progress = Progress::new(&self.flow);
        loop {
            let before = progress.filled();
            progress.restart();
            let attempt = self.fetcher.fetch(offset + before as u64, len - before, out.rest(before), &progress);
            match watched(attempt, &progress).await {
                Ok(()) if progress.filled() == len => return Ok(()),
                Ok(()) => {
                    let got = progress.filled();
                    backoff
                        .wait(Failure::transient(Error::io(format!(
                            "connection closed after {got} of {len} bytes at offset {offset}"
                        ))))
                        .await?
                }
                Err(f) => {
                    // Progress made before a failure resets the retry budget for what is left,
                    // unless the attempt then stalled: a server that sends a little and falls
                    // silent every time would otherwise be retried without end.
                    if progress.filled() > before && !progress.stalled.load(Ordering::Relaxed) {
                        backoff = Backoff::new(self.retry);
                    }
                    backoff.wait(f).await?
                }
            }
        }
    }
}

impl<F: RangeFetch> Source for RangedSource<F> {
    fn describe(&self) -> &str {
        &self.shown
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn caps(&self) -> Caps {
        let reads_into_buffers = self.requests.fetcher.reads_into_buffers();
        // Callers that receive bodies themselves (plain HTTP) are busy while they read: one per
        // core (H200 host, 8 GiB to the CPU: 16.8 GB/s with 16, 13.9–17.1 with 32, less CPU).
        // Otherwise one caller per request in flight: a caller's read splits into requests, but
        // the caller waits for all of them before it asks for more (HTTP to the CPU on the H200
        // host: 17.3-19.0 GB/s with 32 callers vs 13.0-18.1 with 8, docs/benchmarks.md).
        let parallelism = if reads_into_buffers {
            crate::cores().clamp(4, self.max_in_flight.max(4))
        } else if self.ranges {
            self.max_in_flight.clamp(1, 64)
        } else {
            1
        };
        Caps {
            remote: true,
            reads_into_buffers,
            parallelism,
            fs: super::FileSystem::Other,
            pins_version: self.requests.fetcher.pins_version(),
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8], stop: &Stop) -> Result<()> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        // Bytes the open probe already fetched are not fetched again.
        let cached = (self.prefix.len() as u64).saturating_sub(offset).min(buf.len() as u64) as usize;
        if cached > 0 {
            buf[..cached].copy_from_slice(&self.prefix[offset as usize..offset as usize + cached]);
        }
        if cached == buf.len() {
            return Ok(());
        }
        self.fetch_split(offset + cached as u64, &mut buf[cached..], stop).map_err(|e| e.in_file(&self.shown))
    }
    fn read_stream(&self, offset: u64, len: usize, sink: &mut ByteSink<'_>, stop: &Stop) -> Result<()> {
        self.check_range(offset, len)?;
        // Only a range the probe holds whole is served from it: the sink must see no bytes
        // before the request slot is taken (callers take staging buffers in the sink).
        if offset + len as u64 <= self.prefix.len() as u64 {
            return sink(&self.prefix[offset as usize..offset as usize + len]);
        }
        block_on_read(self.requests.fetch_with_retries(offset, len, Out::Sink(sink)), stop)
            .map_err(|e| e.in_file(&self.shown))
    }
    fn read_stream_into(&self, offset: u64, len: usize, dest: &mut dyn StreamDest, stop: &Stop) -> Result<()> {
        self.check_range(offset, len)?;
        if offset + len as u64 <= self.prefix.len() as u64 {
            return dest.put(&self.prefix[offset as usize..offset as usize + len]);
        }
        // On the calling thread (block_on), so a fetcher may block in socket reads here.
        block_on_read(self.requests.fetch_with_retries(offset, len, Out::Dest(dest, stop)), stop)
            .map_err(|e| e.in_file(&self.shown))
    }
}

/// Copies a response body into `dst`: skips the first `skip` bytes (a server that ignored
/// `Range` sends the object from offset 0), counts progress in `progress`, refuses extra bytes.
pub(crate) struct Filler<'a> {
    out: Out<'a>,
    /// Bytes wanted from this response.
    len: usize,
    progress: &'a Progress,
    got: usize,
    skip: u64,
    /// When the body is a whole object, the rest after `dst` is not wanted; otherwise it is an error.
    whole_object: bool,
}

impl<'a> Filler<'a> {
    pub fn new(out: Out<'a>, len: usize, progress: &'a Progress, skip: u64, whole_object: bool) -> Self {
        Filler { out, len, progress, got: 0, skip, whole_object }
    }

    /// Take one body chunk; `Ok(true)` once `dst` is full.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<bool, Failure> {
        if self.skip > 0 {
            let n = (chunk.len() as u64).min(self.skip) as usize;
            chunk = &chunk[n..];
            self.skip -= n as u64;
        }
        let room = self.len - self.got;
        if chunk.len() > room && !self.whole_object {
            return Err(Failure::fatal(Error::io("the server sent more bytes than were asked for")));
        }
        let n = chunk.len().min(room);
        match &mut self.out {
            Out::Buf(dst) => dst[self.got..self.got + n].copy_from_slice(&chunk[..n]),
            Out::Sink(sink) => sink(&chunk[..n]).map_err(Failure::fatal)?,
            Out::Dest(dest, _) => dest.put(&chunk[..n]).map_err(Failure::fatal)?,
        }
        self.got += n;
        self.progress.add(n);
        Ok(self.got == self.len)
    }

    /// The body ended; fewer bytes than asked for means the connection dropped.
    pub fn finish(&self) -> Result<(), Failure> {
        if self.got == self.len {
            Ok(())
        } else {
            Err(Failure::transient(Error::io(format!(
                "the connection closed after {} of {} bytes",
                self.got, self.len
            ))))
        }
    }
}

/// The error for a source whose bytes changed after it was opened.
pub(crate) fn changed(what: &str) -> Failure {
    Failure::fatal(Error::io(format!(
        "the object changed while it was being read ({what}); a load must see one version of the file"
    )))
}

/// A parsed `Content-Range: bytes a-b/total` (or `bytes */total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ContentRange {
    /// First and last byte, inclusive; `None` for `*`.
    pub range: Option<(u64, u64)>,
    /// The object's size; `None` for `*`.
    pub total: Option<u64>,
}

impl ContentRange {
    pub fn parse(v: &str) -> Option<Self> {
        let rest = v.trim().strip_prefix("bytes")?.trim_start();
        let (range, total) = rest.split_once('/')?;
        let total = if total.trim() == "*" { None } else { Some(total.trim().parse().ok()?) };
        let range = if range.trim() == "*" {
            None
        } else {
            let (a, b) = range.trim().split_once('-')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        };
        Some(ContentRange { range, total })
    }

    /// Check the range of a partial response to a request at `offset` of an object of `size` bytes.
    pub fn check(header: Option<&str>, offset: u64, size: u64) -> Result<(), Failure> {
        match header.and_then(Self::parse) {
            Some(ContentRange { total: Some(total), .. }) if total != size => {
                Err(changed(&format!("size {size} became {total}")))
            }
            Some(ContentRange { range: Some((start, _)), .. }) if start == offset => Ok(()),
            _ => Err(Failure::fatal(Error::io("the server answered with a different range than asked for"))),
        }
    }
}

/// An error and its sources on one line (reqwest's and hyper's messages are terse alone).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        let cr = |range, total| Some(ContentRange { range, total });
        assert_eq!(ContentRange::parse("bytes 0-99/1000"), cr(Some((0, 99)), Some(1000)));
        assert_eq!(ContentRange::parse("bytes */0"), cr(None, Some(0)));
        assert_eq!(ContentRange::parse("bytes 5-9/*"), cr(Some((5, 9)), None));
        assert_eq!(ContentRange::parse("items 1-2/3"), None);
        assert!(ContentRange::check(Some("bytes 5-9/10"), 5, 10).is_ok());
        assert!(ContentRange::check(Some("bytes 5-9/*"), 5, 10).is_ok());
        assert!(ContentRange::check(Some("bytes 5-9/12"), 5, 10).unwrap_err().error.message.contains("changed"));
        assert!(!ContentRange::check(Some("bytes 0-9/10"), 5, 10).unwrap_err().retryable);
        assert!(ContentRange::check(None, 5, 10).is_err());
    }

    #[test]
    fn a_silent_request_is_hedged_only_while_others_flow() {
        let opts = crate::storage::StorageOptions {
            stall_timeout: Some(Duration::from_millis(600)),
            hedge_after: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        let flow = Flow::new(&opts);
        let (quiet, busy) = (Progress::new(&flow), Progress::new(&flow));
        quiet.add(10);
        std::thread::sleep(Duration::from_millis(150));
        // Silent past hedge_after, but nobody else received anything: a slow server, not a stall.
        assert!(quiet.verdict().is_ok());
        busy.add(2 << 20);
        let e = quiet.verdict().unwrap_err();
        assert!(e.retryable && e.error.message.contains("sent again on another connection"), "{}", e.error.message);
        assert!(busy.verdict().is_ok());
        // A new attempt starts its silence afresh.
        quiet.restart();
        assert!(quiet.verdict().is_ok());
        // Silent for the stall timeout: given up whatever the others do.
        let lone =
            Progress::new(&Flow::new(&crate::storage::StorageOptions { hedge_after: Some(Duration::ZERO), ..opts }));
        std::thread::sleep(Duration::from_millis(650));
        let e = lone.verdict().unwrap_err();
        assert!(e.retryable && e.error.message.contains("no data for"), "{}", e.error.message);
        assert_eq!(quiet.filled(), 10);
    }

    #[test]
    fn filler_skips_counts_and_refuses_extra() {
        let mut dst = [0u8; 4];
        let progress = Progress::new(&Flow::new(&Default::default()));
        let mut f = Filler::new(Out::Buf(&mut dst), 4, &progress, 2, false);
        assert!(!f.push(b"xxab").unwrap());
        assert!(f.finish().is_err());
        assert!(f.push(b"cd").unwrap());
        assert!(f.finish().is_ok());
        assert!(f.push(b"e").is_err());
        assert_eq!(&dst, b"abcd");
        assert_eq!(progress.filled(), 4);
    }

    #[test]
    fn filler_streams_to_a_sink_and_stops_on_its_error() {
        let mut seen = Vec::new();
        let mut sink = |b: &[u8]| {
            seen.extend_from_slice(b);
            if seen.len() > 4 {
                Err(Error::io("enough"))
            } else {
                Ok(())
            }
        };
        let progress = Progress::new(&Flow::new(&Default::default()));
        {
            let mut f = Filler::new(Out::Sink(&mut sink), 6, &progress, 1, false);
            assert!(!f.push(b"xab").unwrap());
            assert!(!f.push(b"cd").unwrap());
            let err = f.push(b"ef").unwrap_err();
            assert!(!err.retryable && err.error.message.contains("enough"));
        }
        assert_eq!(progress.filled(), 4);
        assert_eq!(seen, b"abcdef");
    }
}
