//! A test process that exits without dropping its cluster must not leave
//! servers or files behind: the watchdog cleans up after it.

use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use read_after_write_testkit::TestCluster;

const CHILD_VAR: &str = "READ_AFTER_WRITE_TESTKIT_WATCHDOG_CHILD";

/// Run by `cleans_up_after_an_exit_without_drop` in a child process: starts
/// a cluster, reports where it is and exits without running destructors.
#[tokio::test]
#[ignore = "helper, run by cleans_up_after_an_exit_without_drop"]
async fn child_exits_without_dropping() {
    if std::env::var_os(CHILD_VAR).is_none() {
        return;
    }
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO])
        .await
        .unwrap();
    println!(
        "CLUSTER {} {} {}",
        cluster.dir().display(),
        cluster.primary_port(),
        cluster.replica(0).port()
    );
    std::process::exit(0);
}

#[test]
fn cleans_up_after_an_exit_without_drop() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_exits_without_dropping",
            "--nocapture",
        ])
        .env(CHILD_VAR, "1")
        .env_remove("KEEP_TEST_CLUSTER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CLUSTER "))
        .unwrap_or_else(|| {
            panic!(
                "child printed no cluster: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let mut parts = line.split(' ');
    let dir = std::path::PathBuf::from(parts.next().unwrap());
    let ports: Vec<u16> = parts.map(|p| p.parse().unwrap()).collect();

    let deadline = Instant::now() + Duration::from_secs(20);
    while dir.exists() {
        assert!(Instant::now() < deadline, "{} still exists", dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    for port in ports {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still open"
        );
    }
}
