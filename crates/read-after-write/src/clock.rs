//! Wall-clock time behind a trait, so token expiry can be tested
//! deterministically.
//!
//! # Example
//!
//! ```
//! use read_after_write::{Clock, ManualClock};
//! use std::time::Duration;
//!
//! let clock = ManualClock::new(1_000);
//! clock.advance(Duration::from_secs(30));
//! assert_eq!(clock.now_unix(), 1_030);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A source of wall-clock time in whole seconds since the Unix epoch.
///
/// Token expiry is compared against this clock. Tokens are issued and checked
/// by different web instances, so it must be wall-clock time, not a monotonic
/// clock.
///
/// ```
/// use read_after_write::{Clock, SystemClock};
///
/// assert!(SystemClock.now_unix() > 1_700_000_000);
/// ```
pub trait Clock: Send + Sync + 'static {
    /// Seconds since 1970-01-01T00:00:00Z.
    fn now_unix(&self) -> u64;
}

/// The operating system's clock.
///
/// On Linux it reads the kernel's coarse wall clock
/// (`CLOCK_REALTIME_COARSE`), which the kernel updates every tick (1 to
/// 10 ms, with the kernel's `HZ`): reading it is a load through the vDSO, about 3 ns, where
/// [`SystemTime::now`](std::time::SystemTime::now) asks the hardware clock (about 33 ns on a cloud VM),
/// and every request with a token reads the clock once. Expiry is in whole
/// seconds, so a reading up to one tick old changes nothing but that a
/// token may still be honoured a few milliseconds past its expiry, as it
/// would be on a server whose clock runs that much behind. Elsewhere it is
/// [`SystemTime::now`](std::time::SystemTime::now).
///
/// ```
/// use read_after_write::{Clock, SystemClock};
///
/// let now = SystemClock.now_unix();
/// assert!(SystemClock.now_unix() >= now);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> u64 {
        system_now_unix()
    }
}

// A clock set before 1970 reads as the epoch: every token then looks
// unexpired, which costs consistency nothing.

#[cfg(any(target_os = "linux", target_os = "android"))]
fn system_now_unix() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    u64::try_from(now.tv_sec).unwrap_or(0)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn system_now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A clock that only moves when told to, for tests.
///
/// Clones share the same time, so a test can keep one and hand another to the
/// layer.
///
/// ```
/// use read_after_write::{Clock, ManualClock};
/// use std::time::Duration;
///
/// let clock = ManualClock::new(10);
/// let shared = clock.clone();
/// clock.set(20);
/// shared.advance(Duration::from_secs(5));
/// assert_eq!(clock.now_unix(), 25);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `unix_seconds`.
    pub fn new(unix_seconds: u64) -> Self {
        ManualClock {
            now: Arc::new(AtomicU64::new(unix_seconds)),
        }
    }

    /// Sets the time.
    pub fn set(&self, unix_seconds: u64) {
        self.now.store(unix_seconds, Ordering::Relaxed);
    }

    /// Moves the time forward by whole seconds of `by`.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_secs(), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}
