//! The primary's connection pool, rebuilt when the primary freezes.
//!
//! sqlx pings every connection it takes back into a pool, without a time
//! bound. On a frozen or partitioned server (no RST) that ping never
//! returns, and the connection keeps its slot: a pool of 10 is exhausted by
//! the first 10 connections in flight when the primary froze, and writes
//! keep failing after the address is repointed to a new primary, until the
//! old server finally dies. So when the tracker sees the primary stop
//! answering, a pool built here from a URL is replaced by a fresh one: new
//! checkouts open connections to wherever the address points now, and the
//! stuck slots stay behind in the old pool, which is closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::PgPool;

/// How many times a pool may be replaced in one process. Each generation
/// lives as long as the replica set (handlers borrow `&PgPool`), so the
/// count is bounded; past it the last pool stays.
const GENERATIONS: usize = 64;

/// How long a replaced pool may take to close its idle connections.
const CLOSE_BOUND: Duration = Duration::from_secs(30);

/// Builds a fresh pool from the options the pool in use has now, so rotated
/// credentials carry over.
pub(crate) type Rebuild = Box<dyn Fn(sqlx::postgres::PgConnectOptions) -> PgPool + Send + Sync>;

/// The primary's pool and the generations that replaced it.
pub(crate) struct PrimaryPools {
    generations: Box<[OnceLock<PgPool>]>,
    /// Index of the pool in use; generations below it are retired.
    current: AtomicUsize,
    /// Builds a fresh pool; `None` for a pool the application brought,
    /// whose settings are not ours to copy.
    rebuild: Option<Rebuild>,
}

impl PrimaryPools {
    pub(crate) fn new(first: PgPool, rebuild: Option<Rebuild>) -> Self {
        let generations: Box<[OnceLock<PgPool>]> =
            (0..GENERATIONS).map(|_| OnceLock::new()).collect();
        let _ = generations[0].set(first);
        PrimaryPools {
            generations,
            current: AtomicUsize::new(0),
            rebuild,
        }
    }

    /// The pool in use.
    #[inline]
    pub(crate) fn current(&self) -> &PgPool {
        let index = self.current.load(Ordering::Acquire);
        // Every index ever stored in `current` was set first.
        match self.generations[index].get() {
            Some(pool) => pool,
            None => self.first(),
        }
    }

    fn first(&self) -> &PgPool {
        self.generations[0]
            .get()
            .or_else(|| self.generations.iter().find_map(OnceLock::get))
            .unwrap_or_else(|| unreachable!("generation 0 is set at construction"))
    }

    /// Replaces the pool in use with a fresh one and closes the old one in
    /// the background. Returns whether it did (not for a pool the
    /// application brought, nor past the generation bound).
    pub(crate) fn replace(&self) -> bool {
        let Some(rebuild) = &self.rebuild else {
            return false;
        };
        let index = self.current.load(Ordering::Acquire);
        let next = index + 1;
        if next >= GENERATIONS {
            tracing::warn!(
                "the primary's pool was rebuilt {GENERATIONS} times; keeping the last one"
            );
            return false;
        }
        let options = self.current().connect_options().as_ref().clone();
        if self.generations[next].set(rebuild(options)).is_err() {
            // Another caller replaced it at the same moment.
            return false;
        }
        self.current.store(next, Ordering::Release);
        if let Some(old) = self.generations[index].get().cloned() {
            // Idle connections close at once; stuck ones never return, so
            // the wait is bounded.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(CLOSE_BOUND, old.close()).await;
            });
        }
        true
    }
}
