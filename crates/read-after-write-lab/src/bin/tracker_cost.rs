//! What the replica tracker costs as the web tier grows: polls per second
//! per replica, and the replicas' CPU for them, with 1, 4, 16 and 64 replica
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
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    instances: Vec<usize>,
    /// Length of each measured window, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Also measure, in the same run, replica sets polling every `<busy>`
    /// ms in use and every `<idle>` ms idle (the defaults before this
    /// version: 20,500), side by side with the current defaults; `none`
    /// measures the current defaults only.
    #[arg(long, default_value = "20,500")]
    compare_with: String,
}

/// A poll setting measured: the current defaults, or explicit intervals.
#[derive(Clone, Copy)]
struct Polling {
    busy: Option<Duration>,
    idle: Option<Duration>,
}

impl Polling {
    fn parse(text: &str) -> Result<Option<Self>, String> {
        if text == "none" {
            return Ok(None);
        }
        let ms = |part: Option<&str>| -> Result<Duration, String> {
            part.and_then(|p| p.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    format!("--compare-with takes `<busy ms>,<idle ms>` or `none`, not {text:?}")
                })
        };
        let mut parts = text.split(',');
        let polling = Polling {
            busy: Some(ms(parts.next())?),
            idle: Some(ms(parts.next())?),
        };
        if parts.next().is_some() {
            return Err(format!("--compare-with takes two numbers, not {text:?}"));
        }
        Ok(Some(polling))
    }
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
    // Every simulated instance holds a tracker connection to each node
    // and a small pool: room for 64 instances and more.
    let cluster = TestCluster::builder()
        .setting("max_connections", "500")
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
    let previous = Polling::parse(&args.compare_with)?;
    let current = Polling {
        busy: None,
        idle: None,
    };
    match previous {
        Some(Polling {
            busy: Some(busy),
            idle: Some(idle),
        }) => println!(
            "polls/s per replica and replica CPU (% of a core), with the current defaults \
             (every {:?} in use, {:?} idle) beside polling every {busy:?} in use, {idle:?} idle",
            read_after_write::pg::defaults::POLL_INTERVAL,
            read_after_write::pg::defaults::IDLE_POLL_INTERVAL,
        ),
        _ => println!("polls/s per replica and replica CPU (% of a core), current defaults"),
    }
    println!(
        "{:>9}  {:>5}  {:>12}  {:>12}  {:>7}  {:>10}  {:>10}",
        "instances", "mode", "polls/s now", "polls/s then", "ratio", "CPU % now", "CPU % then"
    );
    let mut rows = Vec::new();
    for &instances in &args.instances {
        let now = sweep(&cluster, instances, current, window).await?;
        let then = match previous {
            Some(previous) => Some(sweep(&cluster, instances, previous, window).await?),
            None => None,
        };
        for (mode, index) in [("idle", 0), ("busy", 1)] {
            let ours = &now[index];
            let (theirs, ratio, cpu) = match &then {
                Some(then) => (
                    format!("{:.1}", then[index].polls_per_replica_per_second),
                    format!(
                        "{:.2}",
                        ours.polls_per_replica_per_second
                            / then[index].polls_per_replica_per_second
                    ),
                    format!("{:.2}", then[index].replica_cpu_percent),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            println!(
                "{instances:>9}  {mode:>5}  {:>12.1}  {theirs:>12}  {ratio:>7}  {:>10.2}  {cpu:>10}",
                ours.polls_per_replica_per_second, ours.replica_cpu_percent
            );
        }
        let [idle, busy] = now;
        rows.push((instances, idle, busy));
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

/// Builds `instances` replica sets polling as `polling` says, measures
/// them idle then busy, and shuts them down.
async fn sweep(
    cluster: &TestCluster,
    instances: usize,
    polling: Polling,
    window: Duration,
) -> Result<[Window; 2], Box<dyn std::error::Error>> {
    let mut sets = Vec::with_capacity(instances);
    for _ in 0..instances {
        let mut builder = PgReplicaSet::builder()
            .primary_url(cluster.primary_url())
            .max_connections(2);
        if let Some(busy) = polling.busy {
            builder = builder.poll_interval(busy);
        }
        if let Some(idle) = polling.idle {
            builder = builder.idle_poll_interval(idle);
        }
        for replica in cluster.replicas() {
            builder = builder.replica_url(replica.name(), replica.url());
        }
        sets.push(builder.connect().await?);
    }
    // Let every tracker fall to its idle rate: nothing has needed
    // positions since it started.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let idle = measure(cluster, &sets, window, false).await?;
    let busy = measure(cluster, &sets, window, true).await?;
    for set in &sets {
        set.shutdown().await;
    }
    Ok([idle, busy])
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
