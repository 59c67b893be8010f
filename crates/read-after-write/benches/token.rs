//! Affinity token signing and verification, against the `cookie` crate's
//! `SignedJar` (HMAC-SHA256 too) on a value of similar size.
//!
//! Run with `cargo bench -p read-after-write --bench token`.

use std::hint::black_box;
use std::time::Duration;

use cookie::{Cookie, CookieJar, Key};
use criterion::{criterion_group, criterion_main, Criterion};
use read_after_write::token::MAX_ENCODED_LEN;
use read_after_write::{AffinityToken, KeySet, Lsn, SigningKey, TokenError, UserId, WritePosition};

const NAME: &str = "primary_affinity";
const NOW: u64 = 1_800_000_000;

/// 64 cookie-safe characters: the size of the token's raw bytes (version 2:
/// 3 + 8 user id + 8 expiry + 1 count + 28 bookmark + 16 tag).
const JAR_VALUE: &str = "u42.lsn-0-16B3748.tl-1.sys-7301234567890123456.exp-1800.r-a1b2c3";

fn keys() -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[7; 32]).expect("32-byte key"))
}

fn user() -> UserId {
    UserId::from(42u64)
}

fn token() -> AffinityToken {
    let position = WritePosition::new(Lsn::new(0x16B_3748), 1, 7_301_234_567_890_123_456);
    AffinityToken::new(user(), position, NOW + 30)
}

fn cookie_key() -> Key {
    Key::from(&[7u8; 64])
}

/// A jar holding `value` signed by a `SignedJar` under `NAME`, as a
/// request's cookie (an original, so `get` verifies it).
fn jar_with_signed(value: &str) -> CookieJar {
    let key = cookie_key();
    let mut signer = CookieJar::new();
    signer
        .signed_mut(&key)
        .add(Cookie::new(NAME, value.to_owned()));
    let signed = signer.get(NAME).expect("just added").value().to_owned();
    let mut jar = CookieJar::new();
    jar.add_original(Cookie::new(NAME, signed));
    jar
}

fn group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(50);
    group
}

fn sign(c: &mut Criterion) {
    let keys = keys();
    let token = token();
    let key = cookie_key();
    assert_eq!(token.sign(NAME, &keys).len(), 84);

    let mut group = group(c, "token/sign");
    group.bench_function("affinity_token_8b_user", |b| {
        b.iter(|| black_box(&token).sign(black_box(NAME), black_box(&keys)))
    });
    // `SignedJar::add` MACs the value with a fresh HMAC (key absorbed each
    // time), prepends the base64 tag and stores the cookie in the jar. The
    // same name is added every time, so the jar replaces rather than grows.
    let mut jar = CookieJar::new();
    group.bench_function("cookie_signed_jar_add_64ch", |b| {
        b.iter(|| {
            jar.signed_mut(&key)
                .add(Cookie::new(NAME, black_box(JAR_VALUE).to_owned()))
        })
    });
    group.finish();
}

fn verify(c: &mut Criterion) {
    let keys = keys();
    let text = token().sign(NAME, &keys);
    assert!(AffinityToken::verify(&text, NAME, &keys, NOW, &user()).is_ok());
    let key = cookie_key();
    let jar = jar_with_signed(JAR_VALUE);
    assert_eq!(
        jar.signed(&key).get(NAME).map(|c| c.value().to_owned()),
        Some(JAR_VALUE.to_owned())
    );

    let user = user();
    let mut group = group(c, "token/verify");
    group.bench_function("affinity_token_8b_user", |b| {
        b.iter(|| {
            AffinityToken::verify(
                black_box(&text),
                black_box(NAME),
                black_box(&keys),
                black_box(NOW),
                black_box(&user),
            )
        })
    });
    group.bench_function("cookie_signed_jar_get_64ch", |b| {
        b.iter(|| black_box(&jar).signed(&key).get(black_box(NAME)))
    });
    group.finish();
}

fn verify_rejected(c: &mut Criterion) {
    let keys = keys();
    let text = token().sign(NAME, &keys);
    // Change a character inside the tag (not the last one, whose low bits
    // are padding and would make it malformed instead).
    let mut tampered = text.clone().into_bytes();
    tampered[70] = if tampered[70] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    assert_eq!(
        AffinityToken::verify(&tampered, NAME, &keys, NOW, &user()),
        Err(TokenError::BadSignature)
    );
    let too_long = "A".repeat(MAX_ENCODED_LEN + 1);
    let huge = "A".repeat(4096);
    for long in [&too_long, &huge] {
        assert_eq!(
            AffinityToken::verify(long, NAME, &keys, NOW, &user()),
            Err(TokenError::TooLong)
        );
    }
    let key = cookie_key();
    let mut signed = jar_with_signed(JAR_VALUE)
        .get(NAME)
        .expect("present")
        .value()
        .to_owned()
        .into_bytes();
    let last = signed.len() - 1;
    signed[last] ^= 1; // the value, so the MAC no longer matches
    let mut bad_jar = CookieJar::new();
    bad_jar.add_original(Cookie::new(NAME, String::from_utf8(signed).expect("ascii")));
    assert!(bad_jar.signed(&key).get(NAME).is_none());

    let user = user();
    let mut group = group(c, "token/verify_rejected");
    group.bench_function("affinity_token_bad_signature", |b| {
        b.iter(|| AffinityToken::verify(black_box(&tampered), NAME, &keys, NOW, &user))
    });
    group.bench_function("affinity_token_too_long_max_plus_1", |b| {
        b.iter(|| AffinityToken::verify(black_box(&too_long), NAME, &keys, NOW, &user))
    });
    group.bench_function("affinity_token_too_long_4k", |b| {
        b.iter(|| AffinityToken::verify(black_box(&huge), NAME, &keys, NOW, &user))
    });
    group.bench_function("cookie_signed_jar_bad_signature", |b| {
        b.iter(|| black_box(&bad_jar).signed(&key).get(black_box(NAME)))
    });
    group.finish();
}

criterion_group!(benches, sign, verify, verify_rejected);
criterion_main!(benches);
