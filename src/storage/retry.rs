//! Retries with exponential backoff, shared by every remote backend, and the one tokio runtime
//! they run on.
use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::future::{select, Either};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    /// Attempts after the first one.
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Delay before retry number `retry` (1-based): exponential, capped, with full jitter so that
    /// many readers that failed together do not come back together.
    fn delay(&self, retry: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let cap = exp.min(self.max_delay);
        // Half fixed, half random: never retry immediately, never wait longer than the cap.
        cap / 2 + cap.mul_f64(jitter() / 2.0)
    }
}

/// A uniformly distributed number in [0, 1) from a cheap per-process generator (splitmix64);
/// good enough to spread retries, not for anything secret.
fn jitter() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    if seed == 0 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        seed = now.as_nanos() as u64 ^ u64::from(std::process::id());
        STATE.store(seed, Ordering::Relaxed);
    }
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The outcome of one failed attempt: whether trying again could help.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: Error,
    pub retryable: bool,
}

impl Failure {
    pub fn transient(error: Error) -> Self {
        Failure { error, retryable: true }
    }
    pub fn fatal(error: Error) -> Self {
        Failure { error, retryable: false }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::fatal(error)
    }
}

/// Counts attempts of one operation and sleeps between them.
///
/// ```ignore
/// let mut backoff = Backoff::new(policy);
/// loop {
///     match attempt().await {
///         Ok(v) => return Ok(v),
///         Err(f) => backoff.wait(f).await?,
///     }
/// }
/// ```
pub(crate) struct Backoff {
    policy: RetryPolicy,
    retries: u32,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff { policy, retries: 0 }
    }

    /// After a failed attempt: sleep and return `Ok` if another attempt is allowed, otherwise the
    /// error (saying how many attempts were made when more than one).
    pub async fn wait(&mut self, failure: Failure) -> Result<()> {
        if !failure.retryable {
            return Err(failure.error);
        }
        if self.retries >= self.policy.max_retries {
            let mut error = failure.error;
            if self.retries > 0 {
                error.message = format!("{} (gave up after {} attempts)", error.message, self.retries + 1);
            }
            return Err(error);
        }
        self.retries += 1;
        tokio::time::sleep(self.policy.delay(self.retries)).await;
        Ok(())
    }
}

/// The runtime that drives every network request of this process. Created on first use;
/// its workers only do network I/O and TLS, the callers' threads wait in `block_on`.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let cores = crate::cores();
        let workers = std::env::var("TENSORIZER_RS_IO_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(cores.clamp(2, 16))
            .clamp(1, 64);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("tensorizer-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime for network I/O")
    })
}

/// Run `fut` to completion from synchronous code. From a thread that is itself inside a tokio
/// runtime (where `block_on` would panic) the future runs on a helper thread instead.
pub(crate) fn block_on<F: Future + Send>(fut: F) -> F::Output
where
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| s.spawn(|| runtime().block_on(fut)).join().expect("network I/O thread panicked"))
    } else {
        runtime().block_on(fut)
    }
}

thread_local! {
    /// The stop flag of the load this thread reads for (see [`reads_stop_on`]); null if none.
    static STOP: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
}

/// How often a remote read waiting on the network looks at its load's stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);

/// Run `f` with remote reads made on this thread giving up within [`STOP_POLL`] once `flag`
/// is set (a load that failed or was interrupted), instead of waiting for their requests to
/// end: a stalled server would otherwise hold them for the read timeout (60 s). Plain-HTTP
/// reads into our buffers watch the flag themselves ([`super::StreamDest::stopped`]). A
/// closure rather than a guard, so the flag cannot stay registered past its life.
pub fn reads_stop_on<R>(flag: &AtomicBool, f: impl FnOnce() -> R) -> R {
    struct Restore(*const AtomicBool);
    impl Drop for Restore {
        fn drop(&mut self) {
            STOP.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(STOP.with(|s| s.replace(flag)));
    f()
}

/// Whether the load this thread works for (see [`reads_stop_on`]) has stopped; `false` on a
/// thread outside one. For waits outside storage (a key derivation) that should give up too.
pub fn load_stopped() -> bool {
    let flag = STOP.with(|s| s.get());
    // SAFETY: as in `block_on_read`: set only while the `reads_stop_on` borrow lives.
    !flag.is_null() && unsafe { &*flag }.load(Ordering::Relaxed)
}

/// [`block_on`] for a read: ends early with an error once this thread's load stops.
pub(crate) fn block_on_read<T: Send>(fut: impl Future<Output = Result<T>> + Send) -> Result<T> {
    let flag = STOP.with(|s| s.get());
    if flag.is_null() {
        return block_on(fut);
    }
    // SAFETY: set only for the length of a `reads_stop_on` call on this thread, whose borrow
    // of the flag outlives this call and the future that reads it.
    let flag: &AtomicBool = unsafe { &*flag };
    block_on(async move {
        let mut fut = std::pin::pin!(fut);
        let mut poll = tokio::time::interval(STOP_POLL);
        loop {
            match select(fut.as_mut(), std::pin::pin!(poll.tick())).await {
                Either::Left((done, _)) => return done,
                Either::Right(_) if flag.load(Ordering::Relaxed) => {
                    return Err(Error::io("stopped: the load was stopped"));
                }
                Either::Right(_) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let p =
            RetryPolicy { max_retries: 10, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(2) };
        for retry in 1..12 {
            let d = p.delay(retry);
            let cap = (Duration::from_millis(100) * (1 << (retry - 1).min(16))).min(Duration::from_secs(2));
            assert!(d >= cap / 2 && d <= cap, "retry {retry}: {d:?} vs cap {cap:?}");
        }
    }

    #[test]
    fn gives_up_after_max_retries_and_stops_on_fatal() {
        let p =
            RetryPolicy { max_retries: 2, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2) };
        let result: Result<()> = block_on(async {
            let mut b = Backoff::new(p);
            loop {
                b.wait(Failure::transient(Error::io("boom"))).await?;
            }
        });
        assert!(result.unwrap_err().message.contains("gave up after 3 attempts"));
        let result = block_on(Backoff::new(p).wait(Failure::fatal(Error::io("no"))));
        assert_eq!(result.unwrap_err().message, "no");
    }

    #[test]
    fn a_read_gives_up_once_its_load_stops() {
        let flag = AtomicBool::new(false);
        let t0 = std::time::Instant::now();
        reads_stop_on(&flag, || {
            assert_eq!(block_on_read(async { Ok(5) }).unwrap(), 5);
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(150));
                    flag.store(true, Ordering::Relaxed);
                });
                let stalled = block_on_read(async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(())
                });
                assert!(stalled.unwrap_err().message.contains("stopped"));
            });
        });
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert!(STOP.with(|s| s.get()).is_null(), "the flag stays registered");
    }

    #[test]
    fn block_on_works_inside_a_runtime() {
        let v = runtime().block_on(async { block_on(async { 7 }) });
        assert_eq!(v, 7);
    }
}
