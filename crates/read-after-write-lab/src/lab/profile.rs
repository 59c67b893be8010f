//! Lag profiles: how the two replicas lag while a strategy is measured,
//! steady or changing over time.
//!
//! One cluster serves every profile: a profile sets each replica's
//! `recovery_min_apply_delay` ([`TestCluster::set_apply_delay`]) and, for
//! the changing ones, disturbs the cluster on a schedule that starts with
//! each strategy's measured window, so every strategy meets the same
//! disturbance at the same moments of its window.

use std::fmt;
use std::time::Duration;

use read_after_write_testkit::TestCluster;
use serde::Serialize;
use sqlx::Connection;

use super::primary_load;

/// Low apply delay, a replica that keeps up.
const LOW: Duration = Duration::from_millis(5);
/// High apply delay, a replica far behind.
const HIGH: Duration = Duration::from_millis(150);

/// `spiky`: replica 1's replay pauses this long ...
const SPIKE: Duration = Duration::from_secs(1);
/// ... this often ...
const SPIKE_PERIOD: Duration = Duration::from_secs(5);
/// ... starting this far into the window.
const SPIKE_OFFSET: Duration = Duration::from_secs(1);

/// `burst`: a large write transaction this often ...
const BURST_PERIOD: Duration = Duration::from_secs(2);
/// ... starting this far into the window.
const BURST_OFFSET: Duration = Duration::from_millis(500);
/// Rows of [`BALLAST_TABLE`], about 1 kB each: each burst rewrites all of
/// them, a few MB of WAL in one transaction.
const BALLAST_ROWS: i32 = 16_000;

/// The table the `burst` profile rewrites.
pub const BALLAST_TABLE: &str = "lab_ballast";

/// One way the replicas lag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// Both replicas about 5 ms behind.
    SteadyLow,
    /// Both replicas about 150 ms behind.
    SteadyHigh,
    /// One replica about 5 ms behind, the other about 150 ms.
    Skewed,
    /// Both about 5 ms behind, and replica 1's replay paused for 1 s every
    /// 5 s (from 1 s into each measured window).
    Spiky,
    /// Both about 5 ms behind, and a transaction rewriting a few MB on the
    /// primary every 2 s (from 0.5 s into each measured window), so lag
    /// grows while the replicas replay it and drains after.
    Burst,
}

impl Profile {
    /// Every profile, in the order the lab runs them.
    pub const ALL: [Profile; 5] = [
        Profile::SteadyLow,
        Profile::SteadyHigh,
        Profile::Skewed,
        Profile::Spiky,
        Profile::Burst,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Profile::SteadyLow => "steady-low",
            Profile::SteadyHigh => "steady-high",
            Profile::Skewed => "skewed",
            Profile::Spiky => "spiky",
            Profile::Burst => "burst",
        }
    }

    /// What the profile does, for reports.
    pub fn describe(self) -> String {
        let ms = |d: Duration| d.as_millis();
        match self {
            Profile::SteadyLow => format!("both replicas {} ms behind", ms(LOW)),
            Profile::SteadyHigh => format!("both replicas {} ms behind", ms(HIGH)),
            Profile::Skewed => format!("replicas {} ms and {} ms behind", ms(LOW), ms(HIGH)),
            Profile::Spiky => format!(
                "both replicas {} ms behind; replica 1's replay paused {} s every {} s, \
                 from {} s into each window",
                ms(LOW),
                SPIKE.as_secs_f64(),
                SPIKE_PERIOD.as_secs_f64(),
                SPIKE_OFFSET.as_secs_f64()
            ),
            Profile::Burst => format!(
                "both replicas {} ms behind; a transaction rewriting {} rows of 1 kB on the \
                 primary every {} s, from {} s into each window",
                ms(LOW),
                BALLAST_ROWS,
                BURST_PERIOD.as_secs_f64(),
                BURST_OFFSET.as_secs_f64()
            ),
        }
    }

    /// Each replica's apply delay (two replicas).
    pub fn apply_delays(self) -> [Duration; 2] {
        match self {
            Profile::SteadyHigh => [HIGH, HIGH],
            Profile::Skewed => [LOW, HIGH],
            Profile::SteadyLow | Profile::Spiky | Profile::Burst => [LOW, LOW],
        }
    }

    /// Whether the replicas' states differ enough that a strategy without
    /// monotonic reads must go back in time (the negative control's second
    /// half).
    pub fn replicas_differ(self) -> bool {
        matches!(self, Profile::Skewed | Profile::Spiky)
    }

    /// Sets the cluster's replicas to this profile's apply delays and waits
    /// until they have caught up.
    pub async fn apply(self, cluster: &TestCluster) -> Result<(), Box<dyn std::error::Error>> {
        for (index, delay) in self.apply_delays().into_iter().enumerate() {
            if index < cluster.replica_count() {
                cluster.set_apply_delay(index, delay).await?;
            }
        }
        cluster
            .wait_for_replicas_caught_up(Duration::from_secs(30))
            .await?;
        Ok(())
    }

    /// Disturbs the cluster as the profile says, for `window` from now,
    /// and leaves it undisturbed (replay resumed) when it returns. Steady
    /// profiles return at once. A failed step is logged and skipped: it
    /// shows in the results as a profile that did not bite.
    pub async fn disturb(self, cluster: &TestCluster, window: Duration) {
        let started = tokio::time::Instant::now();
        let end = started + window;
        match self {
            Profile::SteadyLow | Profile::SteadyHigh | Profile::Skewed => {}
            Profile::Spiky => {
                let mut pause_at = started + SPIKE_OFFSET;
                while pause_at + SPIKE <= end {
                    tokio::time::sleep_until(pause_at).await;
                    if let Err(error) = cluster.pause_replay(1).await {
                        tracing::warn!(%error, "spiky: could not pause replica 1's replay");
                    }
                    tokio::time::sleep_until(pause_at + SPIKE).await;
                    if let Err(error) = cluster.resume_replay(1).await {
                        tracing::error!(%error, "spiky: could not resume replica 1's replay");
                    }
                    pause_at += SPIKE_PERIOD;
                }
            }
            Profile::Burst => {
                let mut connection =
                    match primary_load::connect_background(cluster.primary_url()).await {
                        Ok(connection) => connection,
                        Err(error) => {
                            tracing::warn!(%error, "burst: could not connect to the primary");
                            return;
                        }
                    };
                let mut burst_at = started + BURST_OFFSET;
                while burst_at < end {
                    tokio::time::sleep_until(burst_at).await;
                    // Every row gets a new version: a few MB of WAL in one
                    // commit, which the replicas replay after it.
                    let update = sqlx::query("update lab_ballast set n = n + 1")
                        .execute(&mut connection)
                        .await;
                    if let Err(error) = update {
                        tracing::warn!(%error, "burst: the large write failed");
                    }
                    burst_at += BURST_PERIOD;
                }
                let _ = connection.close().await;
            }
        }
    }
}

/// Creates [`BALLAST_TABLE`] with its rows, for the `burst` profile.
pub async fn create_ballast(primary: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "create table if not exists lab_ballast (id int primary key, n int not null, pad text not null)",
    )
    .execute(primary)
    .await?;
    // md5 text does not compress, so each row keeps its kilobyte.
    sqlx::query(
        "insert into lab_ballast (id, n, pad) \
         select g, 0, repeat(md5(g::text), 32) from generate_series(1, $1) g \
         on conflict (id) do nothing",
    )
    .bind(BALLAST_ROWS)
    .execute(primary)
    .await?;
    Ok(())
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Profile::ALL
            .into_iter()
            .find(|profile| profile.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown profile {s:?}; use steady-low, steady-high, skewed, spiky or burst"
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_back_from_its_name() {
        for profile in Profile::ALL {
            assert_eq!(profile.name().parse::<Profile>(), Ok(profile));
        }
        assert!("steady".parse::<Profile>().is_err());
    }
}
