//! The lab's counter: a one-row table a background writer advances on the
//! primary, and every read answers as its node had it (see
//! [`readings`](super::readings)), to count monotonic-read violations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use super::primary_load;

/// Creates `lab_counter`, the one-row table the writer advances and every
/// read answers.
pub(crate) async fn create_counter(primary: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("create table if not exists lab_counter (value bigint not null)")
        .execute(primary)
        .await?;
    sqlx::query(
        "insert into lab_counter (value) select 0 where not exists (select from lab_counter)",
    )
    .execute(primary)
    .await?;
    Ok(())
}

/// The background writer: advances `lab_counter` on the primary every
/// interval, on a connection of its own, for the whole run.
pub(crate) struct CounterWriter {
    advances: Arc<AtomicU64>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl CounterWriter {
    pub(crate) async fn start(primary_url: &str, interval: Duration) -> Result<Self, sqlx::Error> {
        // Its own role, so the primary's statement counts leave it out.
        let mut connection = primary_load::connect_background(primary_url).await?;
        let advances = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let counted = Arc::clone(&advances);
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            // A late tick is late, not a burst: the counter's pace stays even.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticks.tick() => {}
                }
                let update = sqlx::query("update lab_counter set value = value + 1")
                    .execute(&mut connection)
                    .await;
                match update {
                    Ok(_) => {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        // The counter stands still from here: `counter_advances`
                        // shows it, and naive's negative control fails.
                        tracing::error!(%error, "the lab counter stopped advancing");
                        break;
                    }
                }
            }
            let _ = connection.close().await;
        });
        Ok(CounterWriter {
            advances,
            stop,
            task,
        })
    }

    /// Advances so far.
    pub(crate) fn advances(&self) -> u64 {
        self.advances.load(Ordering::Relaxed)
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
