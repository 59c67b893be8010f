//! Read-your-writes for a tonic gRPC service over lagging PostgreSQL replicas.
//!
//! The `Posts` service (`posts.proto`) runs behind `ReadAfterWriteLayer`,
//! added with `Server::builder().layer(...)`. `CreatePost` writes through
//! `db.write()`, so its reply carries an `x-primary-affinity` metadata entry
//! (the token). A client that sends it back on `ListMyPosts` reads from a
//! replica that has its post (or from the primary); a client that does not
//! send it reads from any replica and can miss the post it just created.
//! gRPC clients keep no cookies, so the token travels as metadata, which is
//! an HTTP/2 header the layer reads and writes like any other.
//!
//! ```sh
//! # Starts a throwaway primary with two replicas lagging 50 ms and 200 ms,
//! # serves on 127.0.0.1 (a free port), runs a few round trips as user 7,
//! # prints what each read saw and exits.
//! cargo run -p read-after-write-lab --example tonic
//!
//! # Same, then keeps serving on BIND (default 127.0.0.1:50051) until Ctrl-C.
//! cargo run -p read-after-write-lab --example tonic -- --serve
//! ```
//!
//! Configuration (all optional): `DATABASE_URL` (the primary) and
//! `REPLICA_URLS` (comma-separated) to use your own servers instead of the
//! throwaway cluster; `AFFINITY_KEY` (base64, 32 bytes or more; a random key
//! otherwise); `BIND`; `RUST_LOG`.
//!
//! The service, the server and the client helpers are in `service.rs`,
//! which `tests/tonic.rs` reuses.

mod service;
#[path = "../support.rs"]
mod support;

use std::error::Error;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use service::{round_trip, Session};

const ROUND_TRIPS: usize = 5;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let keep_serving = std::env::args().skip(1).any(|arg| arg == "--serve");

    // Keep the cluster (if any) alive until the end of main: dropping it
    // stops the servers and removes their files.
    let (set, _cluster) = support::replica_set().await?;
    service::create_schema(&set).await?;
    let layer = service::layer(set, support::keys()?);

    let default_bind = if keep_serving {
        "127.0.0.1:50051"
    } else {
        "127.0.0.1:0"
    };
    let bind = std::env::var("BIND").unwrap_or_else(|_| default_bind.to_owned());
    let listener = TcpListener::bind(&bind).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(listener, layer, async {
        let _ = stopped.await;
    }));
    println!("gRPC server listening on {addr}\n");

    let mut session = Session::connect(addr, 7).await?;
    let (mut fresh, mut stale) = (0, 0);
    for i in 1..=ROUND_TRIPS {
        let trip = round_trip(&mut session, &format!("post #{i}")).await?;
        println!("CreatePost as user 7 -> id {}", trip.id);
        for (label, listing) in [
            ("with the token   ", &trip.with_token),
            ("without the token", &trip.without_token),
        ] {
            let seen = if listing.contains(trip.id) {
                "has it    "
            } else {
                "MISSES IT "
            };
            println!("  ListMyPosts {label}: {seen} [{}]", listing.route);
        }
        fresh += usize::from(trip.with_token.contains(trip.id));
        stale += usize::from(!trip.without_token.contains(trip.id));
    }
    println!(
        "\nwith the token: {fresh}/{ROUND_TRIPS} reads saw the new post; \
         without it: {stale}/{ROUND_TRIPS} missed it"
    );
    if let Some(token) = &session.token {
        println!("last token ({}): {:?}", service::TOKEN_METADATA, token);
    }

    if keep_serving {
        println!("\nserving on {addr}; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    let _ = stop.send(());
    server.await??;
    Ok(())
}
