//! An opt-in timeline of what each thread of a load did when (`TENSORIZER_RS_TRACE=1`, which
//! the load options turn into [`set_enabled`]), for benchmarks that must tell a fixed start
//! from a slow middle or a long tail. Off, a mark is one load of a flag.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One mark: `CLOCK_MONOTONIC` nanoseconds (Python's `time.monotonic_ns()`), the thread's name,
/// what happened and two numbers whose meaning depends on it (offsets, lengths).
pub type Event = (u64, String, &'static str, u64, u64);

/// Marks kept at most, so a process left tracing cannot grow without bound.
const MAX_EVENTS: usize = 1 << 20;

static EVENTS: Mutex<Vec<Event>> = Mutex::new(Vec::new());

static ON: AtomicBool = AtomicBool::new(false);

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Start or stop recording marks.
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: out-parameter call with a valid clock id.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Record `what` with two numbers, when tracing is on.
#[inline]
pub fn mark(what: &'static str, a: u64, b: u64) {
    if enabled() {
        record(now_ns(), what, a, b);
    }
}

#[cold]
fn record(t: u64, what: &'static str, a: u64, b: u64) {
    let thread = std::thread::current().name().unwrap_or("?").to_string();
    let mut ev = EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    if ev.len() < MAX_EVENTS {
        ev.push((t, thread, what, a, b));
    }
}

/// The marks so far, oldest first; clears them. (A thread's clock reading and its turn at the
/// lock can be overtaken by another thread's, so the order is restored here.)
pub fn take() -> Vec<Event> {
    let mut ev = std::mem::take(&mut *EVENTS.lock().unwrap_or_else(|p| p.into_inner()));
    ev.sort_by_key(|e| e.0);
    ev
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_keep_their_order_and_thread() {
        // This only checks recording and taking (the switch is process-wide).
        super::record(1, "a", 2, 3);
        super::record(4, "b", 5, 6);
        let ev: Vec<_> = super::take().into_iter().filter(|e| e.2 == "a" || e.2 == "b").collect();
        assert_eq!(ev.iter().map(|e| (e.0, e.2, e.3, e.4)).collect::<Vec<_>>(), vec![(1, "a", 2, 3), (4, "b", 5, 6)]);
        assert!(super::take().iter().all(|e| e.2 != "a"));
    }
}
