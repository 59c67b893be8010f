//! The social app on axum: a user posts, is redirected, and must see the post.
//!
//! ```sh
//! cargo run --release --example social
//! ```
//!
//! With no configuration it starts a throwaway PostgreSQL primary with two
//! replicas lagging 50 ms and 200 ms (through the test kit) and prints their
//! URLs. Configuration, all optional:
//!
//! | variable | meaning |
//! |---|---|
//! | `DATABASE_URL` | the primary; with `REPLICA_URLS`, use an existing cluster |
//! | `REPLICA_URLS` | comma-separated replica URLs |
//! | `AFFINITY_KEY` | base64 of at least 32 random bytes, shared by all instances (comma-separated for rotation, current first) |
//! | `BIND` | listen address, default `127.0.0.1:3000` |
//! | `COOKIE_SECURE` | `true` behind HTTPS; default `false`, since this demo serves plain HTTP (the library's default is `Secure`) |
//! | `MAX_WAIT_MS` | the most a session read may wait for a replica (a bound, not a wait); default the layer's, 50 |
//! | `DEBUG_HEADER` | `true` adds `x-read-after-write` to responses |
//! | `REQUEST_TIMEOUT_MS` | a request that takes longer answers 503, default 5000 (`0` turns it off) |
//! | `RUST_LOG` | log filter, default `info` |
//!
//! Identity is demo-only: send `x-user-id: <integer>`, or sign in on the
//! HTML page at `/`, which sets a `demo_user` cookie. `POST /api/signup`
//! and `POST /api/login` establish it in the handler and bind the request
//! to it (`Db::bind_user`), so the next page sees what they wrote.

mod app;
#[path = "../support.rs"]
mod support;

use std::time::Duration;

use tracing_subscriber::EnvFilter;

fn env_flag(name: &str, default: bool) -> bool {
    match std::env::var(name) {
        Ok(value) => !matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        ),
        Err(_) => default,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    // The cluster: an existing one, or a throwaway one of our own (kept
    // alive until the end of main).
    let (replicas, _cluster) = support::replica_set().await?;
    let keys = support::keys()?;
    app::migrate(replicas.primary_pool()).await?;

    let config = app::AppConfig {
        keys,
        cookie_secure: env_flag("COOKIE_SECURE", false),
        // None: the layer's default (DEFAULT_MAX_WAIT).
        max_wait: std::env::var("MAX_WAIT_MS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .map(Duration::from_millis),
        debug_header: env_flag("DEBUG_HEADER", false),
        // sqlx has no client-side query timeout: a frozen primary would hold
        // a request forever without this bound.
        request_timeout: match std::env::var("REQUEST_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(5000)
        {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
    };
    if !config.cookie_secure {
        tracing::info!("the affinity cookie is not Secure, for this plain-HTTP demo; behind HTTPS keep the library's default (COOKIE_SECURE=true here)");
    }
    let router = app::router(replicas.clone(), replicas.clone(), &config);

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    let address = listener.local_addr()?;
    println!("\nserving on http://{address}  (Ctrl-C to stop)");
    if config.cookie_secure {
        println!("  (the cookie is Secure: curl sends it back only over HTTPS, so the curl lines below need COOKIE_SECURE=false)");
    }
    println!("  curl -si -c jar -b jar -H 'x-user-id: 1' -H 'content-type: application/json' -d '{{\"content\":\"hello\"}}' http://{address}/api/posts");
    println!("  curl -s  -c jar -b jar -H 'x-user-id: 1' http://{address}/api/posts");
    println!("  curl -si -c jar -b jar -H 'content-type: application/json' -d '{{\"name\":\"Ada\"}}' http://{address}/api/signup");
    println!("  curl -s  -c jar -b jar http://{address}/api/dashboard");
    println!("  curl -s  http://{address}/metrics | grep read_after_write_reads_total");

    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    replicas.shutdown().await;
    Ok(())
}
