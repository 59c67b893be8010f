//! What the tracker knows about the primary: [`PrimaryState`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::endpoint::TrackerOptions;
use super::outages::Outages;
use super::pools::PrimaryPools;
use super::probe_conn::ProbeTarget;
use crate::position::WalGeometry;

/// How far back the primary's position history reaches; longer time lags
/// are reported as at least this.
pub(crate) const LAG_WINDOW: Duration = Duration::from_secs(60);

/// What the tracker knows about the primary.
pub(crate) struct PrimaryState {
    /// The primary's pool, replaced when the primary is seen frozen.
    pub(crate) pools: Arc<PrimaryPools>,
    /// Maps the primary's pool options to the tracker's own (a monitoring
    /// role or URL); the identity when none was set.
    pub(crate) tracker_options: TrackerOptions,
    /// Page and segment sizes, to round polled positions off a page header
    /// as captures are: a replica's replay stops at the record end.
    pub(crate) geometry: WalGeometry,
    /// Latest insert position seen on the current timeline, for lag figures.
    pub(crate) inserted: AtomicU64,
    /// Current timeline; changes when a failover promoted a new primary.
    pub(crate) timeline: AtomicU32,
    /// The current primary's epoch (see [`heartbeat`](super::heartbeat)):
    /// its timeline in the high 32 bits and a hash of which server it is
    /// in the low ones; 0 while unknown. A heartbeat on a replica proves
    /// something only if it carries this epoch.
    pub(crate) epoch: AtomicU64,
    /// Position of the second heartbeat of the current epoch the tracker
    /// saw written (so at or past the end of the first one's record); 0
    /// until there is one. A replica past it that shows no heartbeat of
    /// this epoch follows another history.
    pub(crate) heartbeat_floor: AtomicU64,
    /// Position of the first heartbeat of the current epoch seen written.
    pub(crate) first_heartbeat: AtomicU64,
    pub(crate) system_id: u64,
    pub(crate) outages: Arc<Outages>,
    pub(crate) healthy: AtomicBool,
    /// When the primary's insert position was first seen at each value on
    /// the current timeline, for the last [`LAG_WINDOW`]: a replica's time
    /// lag is the age of the first position past its replay position.
    pub(crate) history: Mutex<VecDeque<(Instant, u64)>>,
    /// When the primary's position or timeline last changed, in nanoseconds
    /// after the tracker's origin.
    pub(crate) changed_at: AtomicU64,
    /// Set once the pool was replaced for the current silence; cleared by
    /// the next probe that answers.
    pub(crate) pool_replaced: AtomicBool,
}

impl PrimaryState {
    pub(crate) fn new(
        pools: Arc<PrimaryPools>,
        tracker_options: TrackerOptions,
        geometry: WalGeometry,
        system_id: u64,
        outages: Arc<Outages>,
    ) -> Self {
        PrimaryState {
            pools,
            tracker_options,
            geometry,
            inserted: 0.into(),
            timeline: 0.into(),
            epoch: 0.into(),
            heartbeat_floor: 0.into(),
            first_heartbeat: 0.into(),
            system_id,
            outages,
            healthy: true.into(),
            history: Default::default(),
            changed_at: 0.into(),
            pool_replaced: false.into(),
        }
    }

    /// The primary's timeline as last seen by a capture or a poll.
    #[inline]
    pub(crate) fn timeline(&self) -> u32 {
        self.timeline.load(Ordering::Relaxed)
    }

    /// The latest insert position seen on the current timeline.
    pub(crate) fn inserted(&self) -> u64 {
        self.inserted.load(Ordering::Relaxed)
    }

    /// Whether the tracker's last probe of the primary answered in time.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The current primary's epoch; 0 while unknown.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Where the tracker connects to the primary now: the current pool's
    /// options (which follow rotated credentials), through the tracker's
    /// own mapping.
    pub(crate) fn probe_target(&self) -> ProbeTarget {
        let current = self.pools.current().connect_options();
        ProbeTarget::primary((self.tracker_options)(current.as_ref().clone()))
    }

    /// Records a position the primary reported on its current timeline.
    /// Returns whether it was new.
    pub(crate) fn record_position(&self, lsn: u64) -> bool {
        let Ok(mut history) = self.history.lock() else {
            return false;
        };
        if history.back().is_some_and(|&(_, last)| last >= lsn) {
            return false;
        }
        let now = Instant::now();
        history.push_back((now, lsn));
        while history
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) > LAG_WINDOW)
        {
            history.pop_front();
        }
        true
    }

    /// Runs `f` over the position history; `None` if its lock is poisoned.
    pub(crate) fn with_history<R>(
        &self,
        f: impl FnOnce(&VecDeque<(Instant, u64)>) -> R,
    ) -> Option<R> {
        self.history.lock().ok().map(|history| f(&history))
    }

    /// How long ago the primary first had WAL that `replayed` lacks; zero
    /// when the replica has everything the tracker has seen.
    pub(crate) fn time_behind(&self, replayed: u64) -> Duration {
        let Ok(history) = self.history.lock() else {
            return Duration::ZERO;
        };
        let first_ahead = history.partition_point(|&(_, lsn)| lsn <= replayed);
        history
            .get(first_ahead)
            .map_or(Duration::ZERO, |&(at, _)| at.elapsed())
    }

    /// Notes a heartbeat of the current epoch written at `position`; the
    /// second one sets the floor past which every replica on this
    /// primary's history shows the epoch.
    pub(crate) fn note_heartbeat(&self, epoch: u64, position: u64) {
        if epoch == 0 || self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        let first = self.first_heartbeat.load(Ordering::Relaxed);
        if first == 0 {
            let _ = self.first_heartbeat.compare_exchange(
                0,
                position,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else if position > first {
            let _ = self.heartbeat_floor.compare_exchange(
                0,
                position,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
}
