//! What the replica tracker costs as the web tier grows: polls per second
//! per replica, and the replicas' CPU for them, with 1, 4 and 16 replica
//! sets (one per simulated web instance), idle and busy.
//!
//! Every web instance runs its own `PgReplicaSet`, so each adds its own
//! tracker connection to every replica. This starts a real cluster (a
//! primary and two replicas), builds N sets against it, and measures two
//! windows per N:
//!
//! - **idle**: nothing needs positions (no token read, no write);
//! - **busy**: every instance captures a write position and routes a
//!   session read every 20 ms while a writer keeps the primary moving, so
//!   every tracker polls at its active rate.
//!
//! Polls are counted by the library (`PgReplicaSet::tracker_polls`); CPU is
//! the user plus system time of the replicas' backend processes serving the
//! tracker's connections (`application_name = read_after_write_tracker`),
//! read from `/proc`.
//!
//! ```sh
//! cargo run -p read-after-write-lab --release --bin tracker-cost
//! cargo run -p read-after-write-lab --release --bin tracker-cost -- --instances 1,4 --seconds 5
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use read_after_write::pg::PgReplicaSet;
use read_after_write::Backend;
use read_after_write_testkit::TestCluster;
use sqlx::postgres::PgConnection;

/// Measures the tracker's polling cost at several web-tier sizes.
#[derive(Parser, Debug)]
#[command(name = "tracker-cost")]
struct Args {
    /// Numbers of replica sets (simulated web instances) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    instances: Vec<usize>,
    /// Length of each measured window, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times (USER_HZ; 100 on
/// Linux for every architecture this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// One measured window.
struct Window {
    polls_per_replica_per_second: f64,
    /// Percent of one core, per replica, spent serving the tracker.
    replica_cpu_percent: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(20))
        .replica(Duration::from_millis(60))
        .start()
        .await?;
    cluster
        .execute_on_primary(
            "create table tracker_cost (id bigserial primary key, at timestamptz default now())",
        )
        .await?;
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await?;
    let window = Duration::from_secs(args.seconds);
    println!(
        "{:>9}  {:>5}  {:>22}  {:>26}",
        "instances", "mode", "polls/s per replica", "replica CPU (% of a core)"
    );
    let mut rows = Vec::new();
    for &instances in &args.instances {
        let mut sets = Vec::with_capacity(instances);
        for _ in 0..instances {
            let mut builder = PgReplicaSet::builder().primary_url(cluster.primary_url());
            for replica in cluster.replicas() {
                builder = builder.replica_url(replica.name(), replica.url());
            }
            sets.push(builder.connect().await?);
        }
        // Let every tracker fall to its idle rate: nothing has needed
        // positions since it started.
        tokio::time::sleep(Duration::from_secs(6)).await;
        let idle = measure(&cluster, &sets, window, false).await?;
        let busy = measure(&cluster, &sets, window, true).await?;
        for (mode, result) in [("idle", &idle), ("busy", &busy)] {
            println!(
                "{instances:>9}  {mode:>5}  {:>22.1}  {:>26.2}",
                result.polls_per_replica_per_second, result.replica_cpu_percent
            );
        }
        rows.push((instances, idle, busy));
        for set in &sets {
            set.shutdown().await;
        }
    }
    if let Some((instances, _, busy)) = rows.iter().max_by_key(|(n, _, _)| *n) {
        let per_instance = busy.polls_per_replica_per_second / *instances as f64;
        let cpu_per_instance = busy.replica_cpu_percent / *instances as f64;
        println!(
            "\nbusy, per instance: {per_instance:.1} polls/s and {cpu_per_instance:.2} % of a core per replica; \
             100 instances: about {:.0} polls/s and {:.0} % of a core per replica",
            per_instance * 100.0,
            cpu_per_instance * 100.0
        );
    }
    Ok(())
}

/// Measures one window: polls and tracker-backend CPU on the replicas.
async fn measure(
    cluster: &TestCluster,
    sets: &[PgReplicaSet],
    window: Duration,
    busy: bool,
) -> Result<Window, Box<dyn std::error::Error>> {
    let replicas = cluster.replica_count();
    let mut replica_conns = Vec::with_capacity(replicas);
    for index in 0..replicas {
        replica_conns.push(cluster.connect_replica(index).await?);
    }
    let stop = stop_flag();
    let mut load = Vec::new();
    if busy {
        // The primary keeps moving, so replicas replay and reads wait.
        let mut writer = cluster.connect_primary().await?;
        let flag = stop.clone();
        load.push(tokio::spawn(async move {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = sqlx::query("insert into tracker_cost default values")
                    .execute(&mut writer)
                    .await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
        for set in sets {
            let set = set.clone();
            let flag = stop.clone();
            load.push(tokio::spawn(async move {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(position) = set.write_position().await {
                        let _ = set.session(position, Duration::from_millis(20)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        // Let every tracker leave idle before the window opens.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let polls_before: u64 = sets.iter().map(PgReplicaSet::tracker_polls).sum();
    let cpu_before = tracker_ticks(&mut replica_conns).await?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let elapsed = started.elapsed().as_secs_f64();
    let polls_after: u64 = sets.iter().map(PgReplicaSet::tracker_polls).sum();
    let cpu_after = tracker_ticks(&mut replica_conns).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let ticks = cpu_after.saturating_sub(cpu_before) as f64;
    Ok(Window {
        polls_per_replica_per_second: (polls_after - polls_before) as f64
            / replicas as f64
            / elapsed,
        replica_cpu_percent: ticks / TICKS_PER_SECOND / elapsed / replicas as f64 * 100.0,
    })
}

fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

/// User plus system clock ticks of every replica backend serving a tracker
/// connection, summed over the replicas. A backend that ended since is
/// missing from the later sum; the tracker keeps its connections, so none
/// should.
async fn tracker_ticks(conns: &mut [PgConnection]) -> Result<u64, Box<dyn std::error::Error>> {
    let mut total = 0;
    for conn in conns {
        let pids: Vec<(i32,)> = sqlx::query_as(
            "select pid from pg_stat_activity where application_name = 'read_after_write_tracker'",
        )
        .fetch_all(&mut *conn)
        .await?;
        for (pid,) in pids {
            total += process_ticks(pid).unwrap_or(0);
        }
    }
    Ok(total)
}

/// utime + stime of a process, in clock ticks, from `/proc/<pid>/stat`.
fn process_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing
    // parenthesis are space-separated, utime and stime being the 12th and
    // 13th of them.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}
