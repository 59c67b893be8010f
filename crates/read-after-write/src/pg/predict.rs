//! When will a replica have replayed a position? Pure functions over what
//! the tracker already polls, so the rule can be tested without a clock.
//!
//! # The rule
//!
//! A streaming replica replays WAL some time after the primary wrote it: its
//! **replay delay**. The tracker measures it each time a poll finds the
//! replica past a position in the primary's position history: the delay
//! sample is how long ago the primary was first seen at the newest such
//! position. The estimate rises fast and falls slowly
//! ([`smooth_delay`]): a short sample can come from WAL that needed no
//! waiting (with `recovery_min_apply_delay` only commit records wait), and
//! an estimate that is too low makes a read wait for nothing, the one cost
//! this routing exists to avoid.
//!
//! A replica then holds position `P` about `delay` after the primary wrote
//! `P`, so it is predicted in `delay - (now - written_at(P))` ([`predict`]).
//! That holds while the replica keeps to its schedule. A replica that has
//! fallen behind it (the oldest WAL it lacks is older than its delay plus a
//! poll of slack) has slowed down or stopped: it is assumed to need as long
//! again as it is already overdue, or less when it is still moving and its
//! smoothed replay rate would clear the bytes it lacks sooner (late but
//! replaying hard). A
//! read waiting for a replica that stands still thus sees the prediction
//! slip further with every poll and stops waiting once the slip passes its
//! budget. A replica whose replay is paused
//! (`pg_is_wal_replay_paused()`, which turns true as soon as a pause is
//! requested) is predicted never.
//!
//! Why time and not bytes first: a replica held back by an apply delay
//! replays in bursts (nothing while the primary was quiet, then everything
//! at once), so its byte rate says little about when the next commit
//! lands, while its time delay is steady. A byte rate measured in a quiet
//! spell is near zero and would predict "never" for a replica about to
//! replay a burst; so the rate may only make a late replica's prediction
//! sooner (evidence that it is replaying), never later.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How much a longer delay sample moves the estimate: half the way up.
const RISE: f64 = 0.5;
/// How much a shorter delay sample moves the estimate: an eighth of the way
/// down, so one quick replay of WAL that needed no waiting does not undo
/// the delay that commits see.
const FALL: f64 = 0.125;
/// The replay rate's time constant: samples older than this weigh about a
/// third of a fresh one.
const RATE_TIME_CONSTANT: Duration = Duration::from_secs(1);
/// Predictions are capped here: a replica this far out is never waited for.
const FAR: Duration = Duration::from_secs(3600);

/// What the tracker knows about one replica that a read could wait for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ReplicaView {
    /// Replay position at the last poll.
    pub(crate) replayed: u64,
    /// A replay pause is requested or in effect.
    pub(crate) paused: bool,
    /// Smoothed replay delay; `None` until the replica was first seen
    /// replaying past a position the primary was seen at.
    pub(crate) delay: Option<Duration>,
    /// Smoothed replay rate, bytes per second.
    pub(crate) rate: f64,
    /// How long its replay position has not moved.
    pub(crate) still_for: Duration,
    /// How long ago the primary first had WAL the replica lacks; zero when
    /// it has everything the tracker saw.
    pub(crate) lag_now: Duration,
}

/// When a replica is predicted to have replayed `target`, from now:
/// `Some(ZERO)` if it has, `None` for never (paused).
///
/// `since_written` is how long ago the primary first had `target`
/// ([`since_written`]); `slack` is how stale the replica's position may be
/// without the replica being late (its poll interval).
pub(crate) fn predict(
    view: &ReplicaView,
    target: u64,
    since_written: Duration,
    slack: Duration,
) -> Option<Duration> {
    if view.replayed >= target {
        return Some(Duration::ZERO);
    }
    if view.paused {
        return None;
    }
    // Unknown delay: assume none, and let lateness below correct it. A
    // replica never seen replaying is then waited for at most about as long
    // as the read has already waited.
    let delay = view.delay.unwrap_or(Duration::ZERO);
    let mut eta = delay.saturating_sub(since_written);
    let overdue = view.lag_now.saturating_sub(delay.saturating_add(slack));
    if !overdue.is_zero() {
        // Late: assume as long again as it is overdue, unless it is
        // replaying (it moved within the slack) fast enough to clear what it
        // lacks sooner. A smoothed rate outlives a stall by about its time
        // constant, so a replica standing still gets no credit for it.
        let mut late = overdue;
        if view.rate > 0.0 && view.still_for <= slack {
            let missing = (target - view.replayed) as f64;
            let by_rate = Duration::try_from_secs_f64(missing / view.rate).unwrap_or(FAR);
            late = late.min(by_rate);
        }
        eta = eta.max(late);
    }
    Some(eta.min(FAR))
}

/// The next delay estimate after `sample`: rises half way, falls an eighth.
pub(crate) fn smooth_delay(estimate: Option<Duration>, sample: Duration) -> Duration {
    let Some(estimate) = estimate else {
        return sample;
    };
    let (from, to) = (estimate.as_secs_f64(), sample.as_secs_f64());
    let weight = if to > from { RISE } else { FALL };
    Duration::try_from_secs_f64(from + (to - from) * weight).unwrap_or(estimate)
}

/// The next replay-rate estimate (bytes per second) after a poll found the
/// replica `advanced` bytes further than the poll `elapsed` before: an
/// exponential average weighted by time, so fast polls during a wait count
/// no more than slow ones.
pub(crate) fn smooth_rate(rate: f64, advanced: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return rate;
    }
    let sample = advanced as f64 / elapsed.as_secs_f64();
    let weight = 1.0 - (-elapsed.as_secs_f64() / RATE_TIME_CONSTANT.as_secs_f64()).exp();
    let next = rate + (sample - rate) * weight;
    if next.is_finite() && next >= 0.0 {
        next
    } else {
        0.0
    }
}

/// How long before `now` the primary was first seen at `target` or past
/// it. A position past every entry (written through another instance, not
/// polled here yet) was written about now; one older than the whole history
/// at least as long ago as its oldest entry.
pub(crate) fn since_written(
    history: &VecDeque<(Instant, u64)>,
    target: u64,
    now: Instant,
) -> Duration {
    let first_at_or_past = history.partition_point(|&(_, lsn)| lsn < target);
    history
        .get(first_at_or_past)
        .map_or(Duration::ZERO, |&(at, _)| now.saturating_duration_since(at))
}

/// When the primary was first seen with WAL a replica at `replayed` lacks:
/// the first history entry past it, if any.
pub(crate) fn first_missing(history: &VecDeque<(Instant, u64)>, replayed: u64) -> Option<Instant> {
    let first_ahead = history.partition_point(|&(_, lsn)| lsn <= replayed);
    history.get(first_ahead).map(|&(at, _)| at)
}

/// A delay sample for a replica that moved from `before` to `replayed`: how
/// long before `now` the primary was first seen at the newest position it
/// has now passed, if it passed one it had not passed before.
pub(crate) fn delay_sample(
    history: &VecDeque<(Instant, u64)>,
    before: u64,
    replayed: u64,
    now: Instant,
) -> Option<Duration> {
    let passed = history.partition_point(|&(_, lsn)| lsn <= replayed);
    let &(at, lsn) = history.get(passed.checked_sub(1)?)?;
    (lsn > before).then(|| now.saturating_duration_since(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn view(replayed: u64, delay_ms: Option<u64>, lag_ms: u64) -> ReplicaView {
        ReplicaView {
            replayed,
            paused: false,
            delay: delay_ms.map(Duration::from_millis),
            rate: 0.0,
            still_for: Duration::ZERO,
            lag_now: Duration::from_millis(lag_ms),
        }
    }

    #[test]
    fn a_replica_on_schedule_is_predicted_its_delay_after_the_write() {
        // 400 ms delay, the write 10 ms ago, the replica lacking WAL 10 ms old.
        let eta = predict(&view(100, Some(400), 10), 200, 10 * MS, 10 * MS);
        assert_eq!(eta, Some(390 * MS));
        // Already there: now.
        assert_eq!(
            predict(&view(200, Some(400), 0), 200, MS, MS),
            Some(Duration::ZERO)
        );
        // Due any moment: now, not negative.
        assert_eq!(
            predict(&view(100, Some(40), 45), 200, 45 * MS, 10 * MS),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_paused_replica_is_predicted_never_unless_it_already_has_the_position() {
        let mut paused = view(100, Some(5), 0);
        paused.paused = true;
        assert_eq!(predict(&paused, 200, Duration::ZERO, MS), None);
        assert_eq!(
            predict(&paused, 100, Duration::ZERO, MS),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_late_replica_is_assumed_to_need_as_long_again_so_its_prediction_slips() {
        // Delay 50 ms, but the oldest WAL it lacks is 200 ms old: 140 ms
        // overdue (after 10 ms of slack), so at least 140 ms more.
        let eta = predict(&view(100, Some(50), 200), 200, 200 * MS, 10 * MS);
        assert_eq!(eta, Some(140 * MS));
        // Standing still, it slips by as much as time passes.
        let later = predict(&view(100, Some(50), 300), 200, 300 * MS, 10 * MS);
        assert_eq!(later, Some(240 * MS));
    }

    #[test]
    fn a_late_replica_that_replays_fast_is_predicted_by_its_rate() {
        // 140 ms overdue, but 100 bytes missing at 10,000 bytes/s: 10 ms.
        let mut busy = view(0, Some(50), 200);
        busy.rate = 10_000.0;
        assert_eq!(predict(&busy, 100, 200 * MS, 10 * MS), Some(10 * MS));
        // A rate measured in a quiet spell never makes it later: as long
        // again as it is overdue.
        busy.rate = 1.0;
        assert_eq!(predict(&busy, 100, 200 * MS, 10 * MS), Some(140 * MS));
        // Nor does a rate left over from before it stopped moving.
        busy.rate = 10_000.0;
        busy.still_for = 150 * MS;
        assert_eq!(predict(&busy, 100, 200 * MS, 10 * MS), Some(140 * MS));
        // On schedule, the rate is not consulted (replay under an apply
        // delay comes in bursts).
        let mut bursty = view(0, Some(50), 20);
        bursty.rate = 1.0;
        assert_eq!(predict(&bursty, 1_000, 20 * MS, 10 * MS), Some(30 * MS));
    }

    #[test]
    fn an_unknown_delay_waits_about_as_long_as_already_waited() {
        // Never seen replaying: delay taken as zero, lateness decides.
        assert_eq!(
            predict(&view(100, None, 5), 200, 5 * MS, 10 * MS),
            Some(Duration::ZERO)
        );
        assert_eq!(
            predict(&view(100, None, 40), 200, 40 * MS, 10 * MS),
            Some(30 * MS)
        );
    }

    #[test]
    fn the_delay_estimate_rises_fast_and_falls_slowly() {
        assert_eq!(smooth_delay(None, 40 * MS), 40 * MS);
        assert_eq!(smooth_delay(Some(40 * MS), 400 * MS), 220 * MS);
        assert_eq!(smooth_delay(Some(400 * MS), Duration::ZERO), 350 * MS);
        // A run of quick replays still brings it down in the end.
        let mut estimate = 400 * MS;
        for _ in 0..40 {
            estimate = smooth_delay(Some(estimate), 10 * MS);
        }
        assert!(estimate < 15 * MS, "{estimate:?}");
    }

    #[test]
    fn the_rate_is_a_time_weighted_average() {
        // A full second at 1,000 bytes/s from zero: about 63 % of the way.
        let rate = smooth_rate(0.0, 1_000, Duration::from_secs(1));
        assert!((rate - 632.1).abs() < 0.1, "{rate}");
        // Ten polls of 100 ms each weigh the same as one of a second.
        let mut stepped = 0.0;
        for _ in 0..10 {
            stepped = smooth_rate(stepped, 100, Duration::from_millis(100));
        }
        assert!((stepped - rate).abs() < 0.1, "{stepped} vs {rate}");
        // No time passed: nothing learned.
        assert_eq!(smooth_rate(5.0, 1_000, Duration::ZERO), 5.0);
        // Stopped: decays towards zero.
        assert!(smooth_rate(1_000.0, 0, Duration::from_secs(3)) < 50.0);
    }

    fn history(start: Instant, entries: &[(u64, u64)]) -> VecDeque<(Instant, u64)> {
        entries
            .iter()
            .map(|&(ms, lsn)| (start + Duration::from_millis(ms), lsn))
            .collect()
    }

    #[test]
    fn history_answers_when_the_primary_had_a_position() {
        let start = Instant::now();
        let h = history(start, &[(0, 100), (10, 200), (20, 300)]);
        let now = start + 50 * MS;
        // First seen at or past 150: the entry at 200, 40 ms ago.
        assert_eq!(since_written(&h, 150, now), 40 * MS);
        assert_eq!(since_written(&h, 200, now), 40 * MS);
        // Past everything seen: written about now.
        assert_eq!(since_written(&h, 301, now), Duration::ZERO);
        // Before the history: at least as old as it.
        assert_eq!(since_written(&h, 50, now), 50 * MS);

        // A replica at 200 lacks what the primary had at 20 ms.
        assert_eq!(first_missing(&h, 200), Some(start + 20 * MS));
        assert_eq!(first_missing(&h, 300), None);
    }

    #[test]
    fn a_delay_sample_is_the_age_of_the_newest_position_newly_passed() {
        let start = Instant::now();
        let h = history(start, &[(0, 100), (10, 200), (20, 300)]);
        let now = start + 420 * MS;
        // From 150 to 250: passed the entry at 200, first seen 410 ms ago.
        assert_eq!(delay_sample(&h, 150, 250, now), Some(410 * MS));
        // From 250 to 310: passed 300, first seen 400 ms ago.
        assert_eq!(delay_sample(&h, 250, 310, now), Some(400 * MS));
        // Moved, but passed no new entry: no sample.
        assert_eq!(delay_sample(&h, 210, 250, now), None);
        // Before every entry: no sample.
        assert_eq!(delay_sample(&h, 10, 50, now), None);
    }
}
