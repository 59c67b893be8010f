//! What a run of the [workload](super::workload) is asked to do
//! ([`Workload`], [`Arrivals`]) and what it measured ([`Live`] while it
//! runs, [`Measured`] at the end), shared by the run loops and the
//! sessions.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hdrhistogram::Histogram;

#[derive(Clone, Debug)]
pub enum Arrivals {
    /// A fixed offered rate, Poisson: `rate` actions per second on average,
    /// each served by a free session or dropped.
    Open {
        /// Actions offered per second.
        rate: f64,
    },
    /// Every user acts again as soon as its last action ended, after a
    /// think time drawn uniformly from this range.
    Closed {
        /// Think time between a user's actions.
        think: (Duration, Duration),
    },
}

/// What the users do.
#[derive(Clone, Debug)]
pub struct Workload {
    /// How many sessions (users) there are: in the open loop, how many
    /// actions can be in flight at once; in the closed loop, how many run.
    pub users: usize,
    /// How long actions arrive (open loop) or users run (closed loop).
    pub duration: Duration,
    /// Probability that an action is a write (followed at once by an own
    /// read).
    pub write_ratio: f64,
    /// Open or closed loop.
    pub arrivals: Arrivals,
    /// First user id; users are `first_user..first_user + users`.
    pub first_user: i64,
    /// Seeds the arrival times and every user's choices; the same seed
    /// gives every strategy the same arrivals and the same actions.
    pub seed: u64,
}

/// How long a request may take before the client gives up on it (the app's
/// own request timeout is shorter), so every action ends.
pub(super) const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Live counters, for the progress bar.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Own reads that missed the user's last write.
    pub stale: AtomicU64,
    /// Reads that saw an older counter than their session had seen.
    pub violations: AtomicU64,
    /// Arrivals dropped because no session was free (open loop).
    pub dropped: AtomicU64,
}

/// What one run of the workload measured.
#[derive(Debug)]
pub struct Measured {
    /// Actions that arrived (open loop) or were started (closed loop).
    pub arrivals: u64,
    /// Actions that ended without an error.
    pub served: u64,
    /// Arrivals that found no free session and were dropped (open loop).
    pub dropped: u64,
    /// Actions still in flight 15 s after arrivals stopped,
    /// abandoned (their sessions' measurements are lost).
    pub abandoned: u64,
    /// Own-post reads checked for the user's last write.
    pub own_reads: u64,
    /// Of those, how many missed it.
    pub stale_own_reads: u64,
    /// Every read request (own posts, feed, profiles).
    pub reads: u64,
    /// Reads the server routed to the primary (from the debug header).
    pub primary_reads: u64,
    /// Post writes.
    pub writes: u64,
    /// Requests that failed or answered 5xx.
    pub errors: u64,
    /// Sessions (users) that made at least one counter read.
    pub sessions: u64,
    /// Sessions with at least one monotonic-read violation.
    pub sessions_with_violations: u64,
    /// Reads that answered the lab's counter, each checked against the
    /// session's earlier reads.
    pub counter_reads: u64,
    /// Of those, how many saw a smaller counter than an earlier read of the
    /// same session.
    pub monotonic_violations: u64,
    /// Read responses that set the affinity cookie (a new token).
    pub read_tokens: u64,
    /// Read latency in microseconds.
    pub read_latency: Histogram<u64>,
    /// Latency of the own read right after a write, microseconds.
    pub post_write_read_latency: Histogram<u64>,
    /// Write latency in microseconds.
    pub write_latency: Histogram<u64>,
    /// Session reads that waited for a replica and then went to the primary
    /// anyway (the app's [`WASTED_WAIT_HEADER`](super::readings::WASTED_WAIT_HEADER)).
    pub wasted_wait_reads: u64,
    /// How long each of those waited, microseconds.
    pub wasted_wait: Histogram<u64>,
    /// How long the load was offered: the arrival window (open loop) or the
    /// users' running time (closed loop).
    pub elapsed: Duration,
}

impl Measured {
    pub(super) fn empty() -> Self {
        Measured {
            arrivals: 0,
            served: 0,
            dropped: 0,
            abandoned: 0,
            own_reads: 0,
            stale_own_reads: 0,
            reads: 0,
            primary_reads: 0,
            writes: 0,
            errors: 0,
            sessions: 0,
            sessions_with_violations: 0,
            counter_reads: 0,
            monotonic_violations: 0,
            read_tokens: 0,
            read_latency: histogram(),
            post_write_read_latency: histogram(),
            write_latency: histogram(),
            wasted_wait_reads: 0,
            wasted_wait: histogram(),
            elapsed: Duration::ZERO,
        }
    }

    pub(super) fn merge(&mut self, other: Measured) {
        self.arrivals += other.arrivals;
        self.served += other.served;
        self.dropped += other.dropped;
        self.abandoned += other.abandoned;
        self.own_reads += other.own_reads;
        self.stale_own_reads += other.stale_own_reads;
        self.reads += other.reads;
        self.primary_reads += other.primary_reads;
        self.writes += other.writes;
        self.errors += other.errors;
        self.sessions += other.sessions;
        self.sessions_with_violations += other.sessions_with_violations;
        self.counter_reads += other.counter_reads;
        self.monotonic_violations += other.monotonic_violations;
        self.read_tokens += other.read_tokens;
        // All histograms have the same bounds, so adding cannot fail.
        let _ = self.read_latency.add(&other.read_latency);
        let _ = self
            .post_write_read_latency
            .add(&other.post_write_read_latency);
        let _ = self.write_latency.add(&other.write_latency);
        self.wasted_wait_reads += other.wasted_wait_reads;
        let _ = self.wasted_wait.add(&other.wasted_wait);
    }
}

pub(super) fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; these bounds are valid.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("3 sigfigs is valid"))
}
