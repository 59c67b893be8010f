//! Identity from axum-login: sign up, log in, post a note, and the next
//! page shows it, although it reads a lagging replica.
//!
//! ```sh
//! cargo run --example auth
//! ```
//!
//! With no configuration it starts a throwaway PostgreSQL primary with two
//! replicas lagging 50 ms and 200 ms (through the test kit) and prints
//! their URLs; `DATABASE_URL` and `REPLICA_URLS` (comma-separated) use an
//! existing cluster instead, `AFFINITY_KEY` sets the signing keys and
//! `BIND` the listen address (default `127.0.0.1:3000`).
//!
//! The app (`app.rs`) keeps sessions in axum-login's tower-sessions memory
//! store and users in PostgreSQL; the read-after-write layer reads the user
//! from axum-login's `AuthSession`, and sign-up and login bind the request
//! to the user they establish (`Db::bind_user`). The guide page
//! `read_after_write::guide::identity` explains each step.

mod app;
#[path = "../support.rs"]
mod support;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    // An existing cluster, or a throwaway one kept alive until the end.
    let (replicas, _cluster) = support::replica_set().await?;
    let keys = support::keys()?;
    app::migrate(replicas.primary_pool()).await?;
    // Plain HTTP: the session and affinity cookies are not `Secure` here.
    let router = app::router(replicas.clone(), keys, false);

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    let address = listener.local_addr()?;
    let json = "-H 'content-type: application/json'";
    println!("\nserving on http://{address}  (Ctrl-C to stop)");
    println!("  curl -si -c jar -b jar {json} -d '{{\"name\":\"ada\"}}' http://{address}/signup");
    println!("  curl -s  -c jar -b jar http://{address}/me");
    println!("  curl -si -c jar -b jar {json} -d '{{\"text\":\"hello\"}}' http://{address}/notes");
    println!("  curl -s  -c jar -b jar http://{address}/me");
    println!("  curl -si -c jar -b jar -X POST http://{address}/logout");
    println!("  curl -si -c jar2 -b jar2 {json} -d '{{\"name\":\"ada\"}}' http://{address}/login");
    println!("  curl -s  -c jar2 -b jar2 http://{address}/me");

    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    replicas.shutdown().await;
    Ok(())
}
