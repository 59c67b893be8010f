//! Configuration: what is refused when it is set, what the self-check
//! finds, and the service's traits (see `tests.rs` for the harness).

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tower::{service_fn, Layer, Service};

use super::tests::*;
use super::*;
use crate::backend::{Finding, Severity};
use crate::clock::ManualClock;

#[test]
fn a_domain_that_injects_attributes_is_refused_at_configuration() {
    let refused = layer(&fake(), &ManualClock::new(NOW))
        .domain("example.com; SameSite=None")
        .expect_err("refused");
    assert!(refused.to_string().contains("cookie domain"), "{refused}");
}

#[test]
fn a_cookie_name_with_a_line_break_is_refused_at_configuration() {
    let refused = layer(&fake(), &ManualClock::new(NOW))
        .cookie_name("affinity\r\nX-Evil: 1")
        .expect_err("refused");
    assert!(refused.to_string().contains("cookie name"), "{refused}");
}

#[test]
fn cookie_names_and_domains_are_checked_when_configured() {
    let layer = || layer(&fake(), &ManualClock::new(NOW));
    for good in [
        "primary_affinity",
        "__Host-affinity",
        "a",
        "x!#$%&'*+-.^_`|~9",
    ] {
        assert!(layer().cookie_name(good).is_ok(), "{good:?}");
    }
    for bad in [
        "",
        "a b",
        "a;b",
        "a=b",
        "a,b",
        "a\"b",
        "a\r\nb",
        "a\tb",
        "caf\u{e9}",
        "a\0",
        "(a)",
        "a/b",
        "a:b",
        "a@b",
        "{a}",
        "[a]",
        "a?",
        "a\\b",
        "<a>",
    ] {
        let error = layer().cookie_name(bad).err();
        assert_eq!(
            error,
            Some(ConfigError::InvalidCookieName { name: bad.into() }),
            "{bad:?}"
        );
    }
    for good in [
        "example.com",
        ".example.com",
        "a-b.example.com",
        "localhost",
        "127.0.0.1",
        "xn--bcher-kva.example",
        &format!("{}.com", vec!["a".repeat(63); 3].join(".")),
    ] {
        assert!(layer().domain(good).is_ok(), "{good:?}");
    }
    for bad in [
        "",
        ".",
        "..example.com",
        "example.com.",
        "example..com",
        "example.com; SameSite=None",
        "example.com\r\nSet-Cookie: x=1",
        "exa mple.com",
        "example.com,evil.com",
        "a=b",
        "-example.com",
        "example-.com",
        "ex_ample.com",
        "b\u{fc}cher.example",
        &format!("{}.com", "a".repeat(64)),
        &vec!["a".repeat(63); 4].join("."),
    ] {
        let error = layer().domain(bad).err();
        assert_eq!(
            error,
            Some(ConfigError::InvalidDomain { domain: bad.into() }),
            "{bad:?}"
        );
    }
    let message = layer().domain("a;b").err().unwrap().to_string();
    assert!(message.contains("for example `example.com`"), "{message}");
    let message = layer().cookie_name("a b").err().unwrap().to_string();
    assert!(
        message.contains("for example `primary_affinity`"),
        "{message}"
    );
}

fn codes(check: &SelfCheck) -> Vec<&'static str> {
    check.findings().iter().map(Finding::code).collect()
}

#[tokio::test]
async fn the_self_check_weighs_the_cookie_against_how_the_app_is_served() {
    let backend = fake();
    let secure = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1)).identity(identify);
    let http = secure
        .check(CheckContext::new().served_over_https(false))
        .await;
    assert_eq!(
        codes(&http),
        ["secure_cookie_over_http", "layer_order_unchecked"]
    );
    assert!(!http.is_ok());
    assert!(http.findings()[0].message().contains(".secure(false)"));
    let https = secure
        .check(CheckContext::new().served_over_https(true))
        .await;
    assert_eq!(codes(&https), ["layer_order_unchecked"]);
    assert!(https.is_ok(), "{https}");
    let unsaid = secure.check(CheckContext::new()).await;
    assert_eq!(codes(&unsaid), ["secure_cookie", "layer_order_unchecked"]);
    assert!(unsaid.is_ok());

    let plain = secure.clone().secure(false);
    let check = plain
        .check(CheckContext::new().served_over_https(true))
        .await;
    assert_eq!(codes(&check)[0], "insecure_cookie_over_https");
    let check = plain
        .check(CheckContext::new().served_over_https(false))
        .await;
    assert!(check.is_ok(), "{check}");
}

#[tokio::test]
async fn the_self_check_reports_configurations_that_cannot_work() {
    let backend = fake();
    let base = || ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1));
    let https = || CheckContext::new().served_over_https(true);

    let check = base().allow_anonymous(false).check(https()).await;
    assert_eq!(codes(&check), ["no_identity_no_anonymous"]);
    assert_eq!(check.worst(), Some(Severity::Error));

    let check = base()
        .cookie_name("__Host-affinity")
        .unwrap()
        .domain("example.com")
        .unwrap()
        .check(https())
        .await;
    assert_eq!(codes(&check), ["cookie_prefix_refused", "anonymous_tokens"]);
    assert!(check.findings()[0].message().contains("no Domain"));
    let check = base()
        .cookie_name("__secure-affinity")
        .unwrap()
        .secure(false)
        .check(https())
        .await;
    assert_eq!(
        codes(&check)[..2],
        ["cookie_prefix_refused", "insecure_cookie_over_https"]
    );
    assert!(base()
        .cookie_name("__Host-affinity")
        .unwrap()
        .check(https())
        .await
        .is_ok());

    let check = base()
        .debug_header(true)
        .max_wait(Duration::ZERO)
        .check(https())
        .await;
    assert_eq!(
        codes(&check),
        ["anonymous_tokens", "debug_header_on", "no_wait"]
    );
    assert!(check.is_ok());
    // One line per finding, worst first.
    let text = check.to_string();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.starts_with("info: "), "{text}");
}

#[tokio::test]
async fn the_self_check_includes_the_backends_findings_and_gives_it_the_settings() {
    let backend = fake();
    backend.add_finding(Finding::warning(
        "no_healthy_replica",
        "no replica is healthy",
    ));
    let layer = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
        .identity(identify)
        .max_wait(Duration::from_millis(40))
        .ttl(Duration::from_millis(1500));
    let check = layer.check(CheckContext::new().served_over_https(true));
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&check);
    let check = check.await;
    assert_eq!(
        codes(&check),
        ["no_healthy_replica", "layer_order_unchecked"]
    );
    assert!(!check.is_ok());
    let settings = backend.diagnosed_with().unwrap();
    // The TTL the cookie gets: whole seconds, rounded up.
    assert_eq!(
        (settings.max_wait, settings.ttl, settings.uses_positions),
        (Duration::from_millis(40), Duration::from_secs(2), true)
    );

    let check = layer
        .consistency(Consistency::TimeWindow)
        .ttl(Duration::from_secs(3))
        .check(CheckContext::new().served_over_https(true))
        .await;
    assert!(codes(&check).contains(&"time_window_mode"));
    let settings = backend.diagnosed_with().unwrap();
    assert_eq!(
        (settings.ttl, settings.uses_positions),
        (Duration::from_secs(3), false)
    );
}

#[test]
fn the_service_is_clone_send_sync_and_its_future_is_send() {
    fn assert_traits<T: Clone + Send + Sync + 'static>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}
    let backend = fake();
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(steps));
    assert_traits(&svc);
    assert_traits(&layer(&backend, &ManualClock::new(NOW)));
    let future = svc.call(Request::get("/").body(()).unwrap());
    assert_send(&future);
}
