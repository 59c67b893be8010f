//! Lag profiles: how the replicas lag while a strategy is measured, steady
//! or changing over time.
//!
//! One cluster serves every profile of a run. It has as many replicas as
//! the profile of the run that lists the most apply delays needs
//! ([`Profile::cluster_replicas`]): two for the built-in profiles, one per
//! delay for `steady:<delay>,<delay>,...`. A profile that lists fewer
//! delays than the cluster has replicas gives the remaining replicas its
//! last delay ([`Profile::delays_for`]), so `skewed` on three replicas is
//! 5 ms, 150 ms, 150 ms.
//!
//! A profile sets each replica's `recovery_min_apply_delay`
//! ([`TestCluster::set_apply_delay`]) and, for the changing ones, disturbs
//! the cluster on a schedule that starts with each strategy's measured
//! window, so every strategy meets the same disturbance at the same
//! moments of its window.

mod parse;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_burst;

use std::fmt;
use std::time::Duration;

use read_after_write_testkit::TestCluster;
use serde::Serialize;
use sqlx::Connection;

use super::primary_load;
pub use parse::{ProfileList, MAX_APPLY_DELAY, MAX_REPLICAS};

/// Low apply delay, a replica that keeps up.
const LOW: Duration = Duration::from_millis(5);
/// High apply delay, a replica far behind.
const HIGH: Duration = Duration::from_millis(150);

/// `spiky`: each pause of a replica's replay lasts this long ...
const SPIKE: Duration = Duration::from_millis(600);
/// ... the next replica's pause starts this long after the last one's
/// (so one replica at most is paused at any moment) ...
const SPIKE_STAGGER: Duration = Duration::from_secs(1);
/// ... and the first starts this far into the window.
const SPIKE_OFFSET: Duration = Duration::from_millis(500);

/// `burst`: a large write transaction this often ...
const BURST_PERIOD: Duration = Duration::from_secs(2);
/// ... starting this far into the window.
const BURST_OFFSET: Duration = Duration::from_millis(500);
/// Rows of [`BALLAST_TABLE`], about 1 kB each: each burst rewrites all of
/// them, this many kB of WAL, which the replicas replay behind every commit
/// made after it. Sized with [`BURST_WRITERS`] so that replay lag passes
/// the largest budget the lab runs (`lsn-wait-160ms`) for part of each
/// period: on a 2-core machine, 16,000 rows by one writer (the size until
/// then) peaked at 20 to 70 ms, 64,000 rows by four writers at 310 to
/// 360 ms, over 160 ms for about 0.5 s of every 2 s (`tests_burst`
/// measures it).
const BALLAST_ROWS: i32 = 64_000;
/// Connections that write each burst at once, each its own slice of the
/// ballast, each in one transaction: WAL comes faster than a replica's
/// single replay process applies it, as in a batch job with several
/// workers. One writer, however many rows, barely builds lag: the
/// replicas replay its WAL as fast as it comes.
const BURST_WRITERS: usize = 4;

/// The table the `burst` profile rewrites.
pub const BALLAST_TABLE: &str = "lab_ballast";

/// Replicas whose apply delays differ by at least this much make a
/// `steady:` profile one where naive reads must go back in time
/// ([`Profile::replicas_differ`]), as `skewed`'s 145 ms do.
const DIFFER: Duration = Duration::from_millis(100);

/// One way the replicas lag.
///
/// Printed and parsed as its name (`steady-low`, `skewed`, ...), or
/// `steady:20ms,90ms,250ms` for [`Profile::Steady`]; see [`ProfileList`]
/// for a comma-separated list of profiles.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Profile {
    /// Every replica about 5 ms behind.
    SteadyLow,
    /// Every replica about 150 ms behind.
    SteadyHigh,
    /// `replica-1` about 5 ms behind, the other(s) about 150 ms.
    Skewed,
    /// Every replica about 5 ms behind, and the replicas' replay paused in
    /// turn, one replica at a time: `replica-1` for 0.6 s from 0.5 s into
    /// each measured window, `replica-2` for 0.6 s from 1.5 s, and so on,
    /// one pause starting every second, round the replicas and again
    /// (with two replicas each is paused 0.6 s of every 2 s). A pause
    /// starts only with at least 0.3 s of the window left, and ends with
    /// the window at the latest.
    Spiky,
    /// Every replica about 5 ms behind, and four transactions at once
    /// rewriting the ballast table (64,000 rows of 1 kB) on the primary
    /// every 2 s (from 0.5 s into each measured window), so replay lag
    /// grows past the lab's largest budget (160 ms) while the replicas
    /// replay them, and drains after.
    Burst,
    /// A custom steady profile: one apply delay per replica, as given
    /// (`steady:20ms,90ms,250ms` starts three replicas).
    Steady(SteadyDelays),
}

/// The apply delays of a [`Profile::Steady`], one per replica: at least
/// one, at most [`MAX_REPLICAS`], each a whole number of milliseconds up
/// to [`MAX_APPLY_DELAY`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SteadyDelays(Vec<Duration>);

impl SteadyDelays {
    /// The delays, checked: see [`SteadyDelays`].
    pub fn new(delays: Vec<Duration>) -> Result<Self, String> {
        parse::check_delays(&delays)?;
        Ok(SteadyDelays(delays))
    }

    /// The delays, replica by replica.
    pub fn as_slice(&self) -> &[Duration] {
        &self.0
    }
}

impl Profile {
    /// Every built-in profile, in the order the lab runs them.
    pub const ALL: [Profile; 5] = [
        Profile::SteadyLow,
        Profile::SteadyHigh,
        Profile::Skewed,
        Profile::Spiky,
        Profile::Burst,
    ];

    /// A custom steady profile over `delays`, one per replica.
    pub fn steady(delays: Vec<Duration>) -> Result<Self, String> {
        SteadyDelays::new(delays).map(Profile::Steady)
    }

    /// The name used on the command line and in reports
    /// (`steady:20ms,90ms` for a custom steady profile).
    pub fn name(&self) -> String {
        self.to_string()
    }

    /// The name with only letters, digits and dashes
    /// (`steady-20ms-90ms`), for file names.
    pub fn slug(&self) -> String {
        self.name().replace([':', ','], "-")
    }

    /// The apply delays the profile lists, one per replica: two for the
    /// built-in profiles.
    pub fn apply_delays(&self) -> Vec<Duration> {
        match self {
            Profile::SteadyHigh => vec![HIGH, HIGH],
            Profile::Skewed => vec![LOW, HIGH],
            Profile::SteadyLow | Profile::Spiky | Profile::Burst => vec![LOW, LOW],
            Profile::Steady(delays) => delays.as_slice().to_vec(),
        }
    }

    /// Each of `replicas` replicas' apply delay under this profile: the
    /// listed delays, the last one repeated for replicas past the list.
    pub fn delays_for(&self, replicas: usize) -> Vec<Duration> {
        let listed = self.apply_delays();
        let last = listed.last().copied().unwrap_or(LOW);
        (0..replicas)
            .map(|index| listed.get(index).copied().unwrap_or(last))
            .collect()
    }

    /// The replicas a cluster needs for every one of `profiles`: the most
    /// delays any of them lists (two when `profiles` is empty: `skewed`).
    pub fn cluster_replicas(profiles: &[Profile]) -> usize {
        profiles
            .iter()
            .map(|profile| profile.apply_delays().len())
            .max()
            .unwrap_or(2)
            .max(1)
    }

    /// What the profile does on a cluster of `replicas` replicas, for
    /// reports.
    pub fn describe(&self, replicas: usize) -> String {
        let delays = self.delays_for(replicas);
        let listed = self.apply_delays().len();
        let mut text = behind(&delays);
        if listed < replicas {
            text.push_str(&format!(
                " (the profile lists {listed}; the other replicas keep its last delay)"
            ));
        }
        match self {
            Profile::Spiky => text.push_str(&format!(
                "; replay paused in turn, one replica at a time: {} s each, the first from \
                 {} s into each window, the next {} s after the last began, round the {} \
                 replica{} (a pause ends with the window at the latest)",
                SPIKE.as_secs_f64(),
                SPIKE_OFFSET.as_secs_f64(),
                SPIKE_STAGGER.as_secs_f64(),
                replicas,
                if replicas == 1 { "" } else { "s" }
            )),
            Profile::Burst => text.push_str(&format!(
                "; {} transactions at once rewriting {} rows of 1 kB (about {} MB of WAL) on \
                 the primary every {} s, from {} s into each window, which the replicas \
                 replay behind every later commit",
                BURST_WRITERS,
                BALLAST_ROWS,
                BALLAST_ROWS / 1000,
                BURST_PERIOD.as_secs_f64(),
                BURST_OFFSET.as_secs_f64()
            )),
            _ => {}
        }
        text
    }

    /// Whether the replicas' states differ enough that a strategy without
    /// monotonic reads must go back in time (the negative control's second
    /// half): `skewed`, `spiky` (on two replicas or more, which it always
    /// has), and a `steady:` profile whose delays are 100 ms apart or more.
    pub fn replicas_differ(&self) -> bool {
        match self {
            Profile::Skewed | Profile::Spiky => true,
            Profile::SteadyLow | Profile::SteadyHigh | Profile::Burst => false,
            Profile::Steady(delays) => {
                let delays = delays.as_slice();
                let low = delays.iter().min();
                let high = delays.iter().max();
                matches!((low, high), (Some(&low), Some(&high)) if high - low >= DIFFER)
            }
        }
    }

    /// Sets the cluster's replicas to this profile's apply delays (see
    /// [`delays_for`](Self::delays_for)) and waits until they have caught
    /// up.
    pub async fn apply(&self, cluster: &TestCluster) -> Result<(), Box<dyn std::error::Error>> {
        let delays = self.delays_for(cluster.replica_count());
        for (index, delay) in delays.into_iter().enumerate() {
            cluster.set_apply_delay(index, delay).await?;
        }
        cluster
            .wait_for_replicas_caught_up(Duration::from_secs(30))
            .await?;
        Ok(())
    }

    /// Disturbs the cluster as the profile says, for `window` from now,
    /// and leaves it undisturbed (replay resumed, a burst replayed) when it
    /// returns. Steady profiles return at once. A failed step is logged and
    /// skipped: it shows in the results as a profile that did not bite.
    pub async fn disturb(&self, cluster: &TestCluster, window: Duration) {
        match self {
            Profile::Spiky => spikes(cluster, window).await,
            Profile::Burst => bursts(cluster, window).await,
            Profile::SteadyLow | Profile::SteadyHigh | Profile::Skewed | Profile::Steady(_) => {}
        }
    }
}

/// `delays` in words: `both replicas 5 ms behind`, `replicas 5 ms and
/// 150 ms behind`.
fn behind(delays: &[Duration]) -> String {
    let ms = |d: &Duration| format!("{} ms", d.as_millis());
    match delays {
        [] => "no replica".to_owned(),
        [only] => format!("the replica {} behind", ms(only)),
        [first, rest @ ..] if rest.iter().all(|d| d == first) => {
            if delays.len() == 2 {
                format!("both replicas {} behind", ms(first))
            } else {
                format!("all {} replicas {} behind", delays.len(), ms(first))
            }
        }
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(ms).collect();
            format!("replicas {} and {} behind", init.join(", "), ms(last))
        }
    }
}

/// `spiky`'s pauses over `window`: see [`Profile::Spiky`].
async fn spikes(cluster: &TestCluster, window: Duration) {
    let replicas = cluster.replica_count();
    if replicas == 0 {
        return;
    }
    let started = tokio::time::Instant::now();
    let end = started + window;
    let mut pause_at = started + SPIKE_OFFSET;
    let mut index = 0;
    while pause_at + SPIKE / 2 <= end {
        tokio::time::sleep_until(pause_at).await;
        let name = cluster.replica(index).name().to_owned();
        if let Err(error) = cluster.pause_replay(index).await {
            tracing::warn!(%error, "spiky: could not pause {name}'s replay");
        }
        tokio::time::sleep_until((pause_at + SPIKE).min(end)).await;
        if let Err(error) = cluster.resume_replay(index).await {
            tracing::error!(%error, "spiky: could not resume {name}'s replay");
        }
        pause_at += SPIKE_STAGGER;
        index = (index + 1) % replicas;
    }
}

/// `burst`'s large writes over `window`: see [`Profile::Burst`]. Waits
/// after the window until the replicas have replayed the last burst, so
/// the next strategy starts with replicas at their apply delays.
async fn bursts(cluster: &TestCluster, window: Duration) {
    let size = BurstSize {
        rows: BALLAST_ROWS,
        writers: BURST_WRITERS,
    };
    bursts_of(cluster, window, size).await;
}

/// How large each burst is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BurstSize {
    /// The ballast rows, each rewritten once per burst.
    pub(crate) rows: i32,
    /// Connections writing at once, each its own slice of the rows.
    pub(crate) writers: usize,
}

/// Bursts of `size` over `window`, as [`bursts`].
pub(crate) async fn bursts_of(cluster: &TestCluster, window: Duration, size: BurstSize) {
    let started = tokio::time::Instant::now();
    let end = started + window;
    let writers = size.writers.max(1);
    let slice = (size.rows + writers as i32 - 1) / writers as i32;
    let mut tasks = Vec::with_capacity(writers);
    for writer in 0..writers {
        let mut connection = match primary_load::connect_background(cluster.primary_url()).await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "burst: could not connect to the primary");
                continue;
            }
        };
        let first = writer as i32 * slice + 1;
        let last = first + slice - 1;
        tasks.push(tokio::spawn(async move {
            let mut burst_at = started + BURST_OFFSET;
            while burst_at < end {
                tokio::time::sleep_until(burst_at).await;
                // Every row of the slice gets a new version: about a
                // kilobyte of WAL each, in one commit.
                let update =
                    sqlx::query("update lab_ballast set n = n + 1 where id between $1 and $2")
                        .bind(first)
                        .bind(last)
                        .execute(&mut connection)
                        .await;
                if let Err(error) = update {
                    tracing::warn!(%error, "burst: the large write failed");
                }
                // A burst that outlasted its period (a loaded machine)
                // skips the slots it overran: the replicas get a quiet
                // spell to drain in, as the profile promises.
                let now = tokio::time::Instant::now();
                burst_at += BURST_PERIOD;
                while burst_at < now {
                    burst_at += BURST_PERIOD;
                }
            }
            let _ = connection.close().await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    if let Err(error) = cluster
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .await
    {
        tracing::warn!(%error, "burst: the replicas did not catch up after the window");
    }
}

/// Creates [`BALLAST_TABLE`], and fills it when one of `profiles` is
/// `burst` (runs without it skip the write and its replay).
pub async fn create_ballast(
    primary: &sqlx::PgPool,
    profiles: &[Profile],
) -> Result<(), sqlx::Error> {
    // Half-full pages: each burst's new row versions fit beside the old
    // ones (HOT updates), and the next burst prunes the old, so the table
    // keeps its size from burst to burst.
    sqlx::query(
        "create table if not exists lab_ballast \
         (id int primary key, n int not null, pad text not null) with (fillfactor = 50)",
    )
    .execute(primary)
    .await?;
    if profiles.contains(&Profile::Burst) {
        fill_ballast(primary, BALLAST_ROWS).await?;
    }
    Ok(())
}

/// Gives [`BALLAST_TABLE`] `rows` rows of about 1 kB.
pub(crate) async fn fill_ballast(primary: &sqlx::PgPool, rows: i32) -> Result<(), sqlx::Error> {
    // md5 text does not compress, so each row keeps its kilobyte.
    sqlx::query(
        "insert into lab_ballast (id, n, pad) \
         select g, 0, repeat(md5(g::text), 32) from generate_series(1, $1) g \
         on conflict (id) do nothing",
    )
    .bind(rows)
    .execute(primary)
    .await?;
    Ok(())
}

impl Serialize for Profile {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A profile as a report describes it, on the run's cluster.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileInfo {
    /// The profile.
    pub profile: Profile,
    /// What it does.
    pub description: String,
    /// The replicas' apply delays, milliseconds, replica by replica.
    pub apply_delays_ms: Vec<u64>,
}

impl ProfileInfo {
    /// `profile` on a cluster of `replicas` replicas.
    pub fn new(profile: &Profile, replicas: usize) -> Self {
        ProfileInfo {
            profile: profile.clone(),
            description: profile.describe(replicas),
            apply_delays_ms: profile
                .delays_for(replicas)
                .iter()
                .map(|d| d.as_millis() as u64)
                .collect(),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Profile::SteadyLow => f.write_str("steady-low"),
            Profile::SteadyHigh => f.write_str("steady-high"),
            Profile::Skewed => f.write_str("skewed"),
            Profile::Spiky => f.write_str("spiky"),
            Profile::Burst => f.write_str("burst"),
            Profile::Steady(delays) => {
                f.write_str("steady:")?;
                for (i, delay) in delays.as_slice().iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}ms", delay.as_millis())?;
                }
                Ok(())
            }
        }
    }
}
