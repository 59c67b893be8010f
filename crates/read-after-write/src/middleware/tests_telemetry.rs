//! What the layer reports: metrics, and the warning when writes come
//! without an identity (see `tests.rs` for the harness; token outcomes are
//! counted in `tests_hostile`, failed captures in `tests_issuance`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::DebugValue;

use super::tests::*;
use super::*;
use crate::clock::ManualClock;
use crate::config::Throttle;

#[tokio::test]
async fn a_write_without_identity_warns_once_a_minute_naming_the_layer_order() {
    let metrics = Metrics::record();
    let warnings = Warnings::default();
    let _tracing = warnings.capture();

    let backend = fake();
    let clock = ManualClock::new(NOW);
    let app = App::new(layer(&backend, &clock));
    // The auth layer sits inside: the identity function finds no user.
    let answer = app.post("/write").send().await;
    assert!(answer.issued_cookie().is_none());
    let logged = warnings.taken();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        logged[0].contains("is the authentication layer inside ReadAfterWriteLayer?"),
        "{}",
        logged[0]
    );
    assert!(logged[0].contains("added after it, with Router::layer"));

    // Within the minute: counted, not logged again. Reads and writes with
    // an identity are neither.
    clock.advance(Duration::from_secs(59));
    app.post("/write").send().await;
    app.get("/read").send().await;
    app.post("/write").user(3).send().await;
    assert!(warnings.taken().is_empty());
    assert_eq!(
        metrics.value("read_after_write_writes_without_identity_total"),
        Some(DebugValue::Counter(2))
    );

    // A minute after the first warning, the next one gets through.
    clock.advance(Duration::from_secs(1));
    app.post("/write").send().await;
    assert_eq!(warnings.taken().len(), 1);
    // A clock set back far does not silence it for as long.
    clock.set(NOW - 3600);
    app.post("/write").send().await;
    assert_eq!(warnings.taken().len(), 1);
    assert_eq!(
        metrics.value("read_after_write_writes_without_identity_total"),
        Some(DebugValue::Counter(2)), // since the last snapshot
    );

    // Each layer has its own limit, and without an identity function the
    // message names the other cause.
    let bare = App::new(
        ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
            .allow_anonymous(false)
            .clock(clock.clone()),
    );
    bare.post("/write").send().await;
    let logged = warnings.taken();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        logged[0].contains("no identity function is set"),
        "{}",
        logged[0]
    );
}

#[test]
fn the_throttle_lets_exactly_one_racer_through() {
    let throttle = Arc::new(Throttle::default());
    let passed = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..1000 {
                    if throttle.allow(NOW) {
                        passed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(passed.load(Ordering::Relaxed), 1);
    assert!(!throttle.allow(NOW + Throttle::INTERVAL_SECONDS - 1));
    assert!(throttle.allow(NOW + Throttle::INTERVAL_SECONDS));
}

/// Collects the messages of `WARN` events on this thread: a test subscriber
/// without `tracing-subscriber`.
#[derive(Clone, Default)]
struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

impl Warnings {
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// Collects this thread's warnings until the guard drops.
    ///
    /// tracing caches each call site's interest across threads: a test on
    /// another thread without a subscriber can leave a call site cached as
    /// "never", and this thread's warning is then lost. A global subscriber
    /// that answers "sometimes" for every call site keeps any from being
    /// cached as "never", so the thread's own subscriber is always asked.
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let _ = tracing::subscriber::set_global_default(AskEveryTime);
        });
        tracing::subscriber::set_default(self.clone())
    }
}

/// A global subscriber that records nothing and never lets a call site be
/// cached as disabled (see [`Warnings::capture`]).
struct AskEveryTime;

impl tracing::Subscriber for AskEveryTime {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl tracing::Subscriber for Warnings {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    *self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = String::new();
        event.record(&mut Message(&mut message));
        self.0.lock().unwrap().push(message);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
