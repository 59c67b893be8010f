//! Hostile input, generated from a seed: token verification and the layer
//! must never panic, never accept a forgery, never answer 5xx, and never let
//! junk hide a valid token.
//!
//! Reproducible: `HOSTILE_SEED` (default below) picks the inputs,
//! `HOSTILE_INPUTS` (default 1,000,000) how many tokens are tried, and
//! `HOSTILE_REQUESTS` (default 100,000) how many requests go through the
//! layer. A failure prints the seed and the input. The longer run:
//!
//! ```text
//! HOSTILE_INPUTS=10000000 cargo test --release -p read-after-write --test hostile
//! ```
//!
//! Throughput and the worst per-request time in the layer are printed
//! (`--nocapture`), never asserted: this is a correctness test, not a
//! benchmark.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response};
use read_after_write::middleware::{DEFAULT_COOKIE_NAME, DEFAULT_TOKEN_HEADER};
use read_after_write::token::MAX_ENCODED_LEN;
use read_after_write::{
    AffinityToken, Bookmarks, Db, KeySet, Lsn, ManualClock, ReadAfterWriteLayer, SigningKey,
    TokenError, TokenOutcome, UserId, WritePosition,
};
use tower::{service_fn, Layer, Service, ServiceExt};

#[path = "../src/testing/fake_backend.rs"]
mod fake_backend;

use fake_backend::FakeBackend;

const NAME: &str = DEFAULT_COOKIE_NAME;
const NOW: u64 = 1_800_000_000;
const DEFAULT_SEED: u64 = 0x5EED_0FA1_1BAD_C0DE;
/// Well-formed forgeries naming the requester, plus valid tokens, that one
/// request in the "junk beside a valid token" scenarios may carry: below
/// `MAX_MACS_PER_REQUEST`, so no junk may hide the valid token.
const MAX_FORGED_PER_REQUEST: usize = 8;
const MAX_VALID_PER_REQUEST: usize = 4;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// SplitMix64: tiny, fast in a debug build, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), bias irrelevant here.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn keys(byte: u8) -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[byte; 32]).expect("32-byte key"))
}

/// A key whose one-byte id equals `keys(1)`'s: its tokens pass every check
/// but the MAC.
fn colliding_keys() -> KeySet {
    let id = keys(1).current().id();
    (2u8..=255)
        .map(keys)
        .find(|set| set.current().id() == id)
        .expect("some byte gives a colliding one-byte key id")
}

fn user_of_len(rng: &mut Rng, len: usize) -> UserId {
    UserId::new(&rng.bytes(len)).expect("at most 255 bytes")
}

fn random_position(rng: &mut Rng) -> WritePosition {
    match rng.below(8) {
        0 => WritePosition::default(),
        1 => WritePosition::new(Lsn::new(rng.next()), u32::MAX, u64::MAX),
        _ => WritePosition::new(
            Lsn::new(rng.next() >> rng.below(64)),
            1 + rng.below(3) as u32,
            rng.below(3) as u64,
        ),
    }
}

/// What one fuzz input is, so its outcome can be judged.
enum Expect {
    /// Anything but success: junk, a forgery, a mutation.
    Refused,
    /// Refused for exactly this reason.
    RefusedAs(TokenError),
    /// The genuine token, unchanged: must verify to exactly this.
    Genuine(AffinityToken),
}

/// The documented reasons; a new variant must be documented and added here.
fn documented(error: TokenError) -> bool {
    matches!(
        error,
        TokenError::Malformed
            | TokenError::BadSignature
            | TokenError::UnknownKey
            | TokenError::Expired
            | TokenError::WrongVersion
            | TokenError::TooLong
            | TokenError::OtherUser
    )
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// One hostile input made from `genuine` (signed as `text`).
fn fuzz_mutation(
    rng: &mut Rng,
    genuine: &AffinityToken,
    text: &String,
    other: &[KeySet],
) -> (String, u64, Expect) {
    let raw = || URL_SAFE_NO_PAD.decode(text).expect("we encoded it");
    match rng.below(14) {
        // Random bytes, as lossy text: control characters, non-ASCII.
        0 => {
            let len = rng.below(2 * MAX_ENCODED_LEN);
            let bytes = rng.bytes(len);
            (
                String::from_utf8_lossy(&bytes).into_owned(),
                NOW,
                Expect::Refused,
            )
        }
        // Random base64url of any length around the limit.
        1 => {
            let len = rng.below(MAX_ENCODED_LEN + 16);
            let text = (0..len).map(|_| *rng.pick(ALPHABET) as char).collect();
            (text, NOW, Expect::Refused)
        }
        // Random bytes shaped like a version 1 token: right version, known
        // key id, consistent user length, far expiry. Only the user binding
        // (almost surely another user's) or the MAC stops them.
        2 => {
            let user_len = rng.below(256);
            let mut raw = rng.bytes(3 + user_len + 28 + 16);
            raw[0] = 1;
            raw[1] = keys(1).current().id();
            raw[2] = user_len as u8;
            let expiry = 3 + user_len + 20;
            raw[expiry..expiry + 8].copy_from_slice(&u64::MAX.to_be_bytes());
            (URL_SAFE_NO_PAD.encode(raw), NOW, Expect::Refused)
        }
        // Bit flips: one to three.
        3 => {
            let mut forged = raw();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(forged.len());
                forged[at] ^= 1 << rng.below(8);
            }
            judge_mutation(forged, raw(), genuine)
        }
        // Truncation.
        4 => {
            let mut forged = raw();
            forged.truncate(rng.below(forged.len()));
            judge_mutation(forged, raw(), genuine)
        }
        // Extension, sometimes past the longest token.
        5 => {
            let mut forged = raw();
            let most = if rng.chance(4) { 400 } else { 8 };
            let extra = 1 + rng.below(most);
            forged.extend(rng.bytes(extra));
            judge_mutation(forged, raw(), genuine)
        }
        // Swapped fields: two 4-byte windows of the bookmarks and expiry,
        // or the user tag's bytes rotated.
        6 => {
            let mut forged = raw();
            // Version 3: the user tag at 2..10, the expiry at 10..18, the
            // count at 18, the bookmarks from 19 to the MAC.
            let words = (forged.len() - 16 - 10) / 4;
            let (a, b) = (10 + 4 * rng.below(words), 10 + 4 * rng.below(words));
            for i in 0..4 {
                forged.swap(a + i, b + i);
            }
            if rng.chance(2) {
                forged[2..10].rotate_left(1);
            }
            judge_mutation(forged, raw(), genuine)
        }
        // Signed with another key: another id, or one colliding with ours.
        7 => {
            let set = rng.pick(other);
            let text = genuine.sign(NAME, set);
            if set.current().id() == keys(1).current().id() {
                // Under our key the other key's tag names (almost surely)
                // another user; if not, the MAC refuses it.
                (text, NOW, Expect::Refused)
            } else {
                (text, NOW, Expect::RefusedAs(TokenError::UnknownKey))
            }
        }
        // Signed for another cookie name.
        8 => {
            let name = *rng.pick(&["session", "primary_affinitY", "primary_affinity\0", ""]);
            (
                genuine.sign(name, &keys(1)),
                NOW,
                Expect::RefusedAs(TokenError::BadSignature),
            )
        }
        // Expired: at or after its expiry.
        9 => {
            let at = genuine.expires_at().saturating_add(rng.below(3) as u64);
            (text.clone(), at, Expect::RefusedAs(TokenError::Expired))
        }
        // Oversized: a valid token with text appended beyond the limit.
        10 => {
            let mut long = text.clone();
            while long.len() <= MAX_ENCODED_LEN {
                long.push(*rng.pick(ALPHABET) as char);
            }
            (long, NOW, Expect::RefusedAs(TokenError::TooLong))
        }
        // Non-ASCII: a character replaced or inserted.
        11 => {
            let mut chars: Vec<char> = text.chars().collect();
            let at = rng.below(chars.len());
            let odd = *rng.pick(&[
                'é', '🍪', '\u{0}', '\u{feff}', 'Ａ', '=', '+', '/', ' ', '.',
            ]);
            if rng.chance(2) {
                chars[at] = odd;
            } else {
                chars.insert(at, odd);
            }
            (chars.into_iter().collect(), NOW, Expect::Refused)
        }
        // A character of the text replaced by another of the alphabet.
        12 => {
            let mut forged = text.clone().into_bytes();
            let at = rng.below(forged.len());
            let replacement = *rng.pick(ALPHABET);
            let changed = forged[at] != replacement;
            forged[at] = replacement;
            let forged = String::from_utf8(forged).expect("ascii");
            if changed {
                (forged, NOW, Expect::Refused)
            } else {
                (forged, NOW, Expect::Genuine(genuine.clone()))
            }
        }
        // The genuine token itself: the control.
        _ => (text.clone(), NOW, Expect::Genuine(genuine.clone())),
    }
}

/// A mutation that happens to restore the original is the genuine token.
fn judge_mutation(
    forged: Vec<u8>,
    original: Vec<u8>,
    genuine: &AffinityToken,
) -> (String, u64, Expect) {
    let text = URL_SAFE_NO_PAD.encode(&forged);
    if forged == original {
        (text, NOW, Expect::Genuine(genuine.clone()))
    } else if text.len() > MAX_ENCODED_LEN {
        (text, NOW, Expect::RefusedAs(TokenError::TooLong))
    } else {
        (text, NOW, Expect::Refused)
    }
}

#[test]
fn token_verification_survives_a_million_hostile_inputs() {
    let seed = env_u64("HOSTILE_SEED", DEFAULT_SEED);
    let inputs = env_u64("HOSTILE_INPUTS", 1_000_000);
    let mut rng = Rng(seed);
    let keys = keys(1);
    // Genuine tokens to mutate: every user-id length class, all kinds of
    // positions, one per key-id-sharing edge.
    let pool: Vec<(AffinityToken, String)> = (0..64)
        .map(|i| {
            let len = match i % 4 {
                0 => 0,
                1 => 8,
                2 => 255,
                _ => rng.below(256),
            };
            let token = AffinityToken::new(
                user_of_len(&mut rng, len),
                random_position(&mut rng),
                NOW + 1 + rng.below(1_000_000) as u64,
            );
            let text = token.sign(NAME, &keys);
            let signed =
                AffinityToken::verify(&text, NAME, &keys, NOW, token.user()).expect("genuine");
            (signed, text)
        })
        .collect();
    let other = [self::keys(2), self::keys(3), colliding_keys()];

    let mut counts = [0u64; 8];
    let started = Instant::now();
    for n in 0..inputs {
        let (genuine, signed) = rng.pick(&pool);
        let (text, now, expect) = fuzz_mutation(&mut rng, genuine, signed, &other);
        let outcome = AffinityToken::verify(&text, NAME, &keys, now, genuine.user());
        let context = || format!("HOSTILE_SEED={seed} input #{n}: {text:?} at {now}");
        match (&expect, &outcome) {
            (Expect::Genuine(token), Ok(verified)) => {
                assert_eq!(verified, token, "{}", context())
            }
            (Expect::Genuine(_), Err(error)) => {
                panic!("a genuine token was refused ({error}): {}", context())
            }
            (_, Ok(verified)) => panic!("a forgery verified as {verified:?}: {}", context()),
            (Expect::RefusedAs(expected), Err(error)) => {
                assert_eq!(error, expected, "{}", context())
            }
            (Expect::Refused, Err(error)) => {
                assert!(documented(*error), "undocumented {error:?}: {}", context())
            }
        }
        let slot = match outcome {
            Ok(_) => 0,
            Err(TokenError::Malformed) => 1,
            Err(TokenError::BadSignature) => 2,
            Err(TokenError::UnknownKey) => 3,
            Err(TokenError::Expired) => 4,
            Err(TokenError::WrongVersion) => 5,
            Err(TokenError::TooLong) => 6,
            Err(_) => 7,
        };
        counts[slot] += 1;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "hostile tokens: {inputs} inputs (seed {seed}) in {:.2?}: {:.0} inputs/s; \
         ok {} malformed {} bad_signature {} unknown_key {} expired {} wrong_version {} too_long {}",
        elapsed,
        inputs as f64 / elapsed.as_secs_f64(),
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        counts[4],
        counts[5],
        counts[6],
    );
    // Each kind of outcome was reached, so the generator exercises them all.
    assert!(
        counts.iter().take(7).all(|&c| c > 0) || inputs < 10_000,
        "{counts:?}"
    );
}

/// The shared test double (never a database's behaviour), answering at
/// once from constants: session reads go to a replica that holds
/// everything, or to the primary for a pinned token.
fn constant_backend() -> FakeBackend {
    FakeBackend::new()
        .replica_caught_up()
        .primary_at(0x16B_3748)
        .system_id(1)
        .capture_at_once()
}

/// What the handler saw.
#[derive(Clone, Debug)]
struct Seen {
    outcome: TokenOutcome,
    required: Option<WritePosition>,
    read_pool: &'static str,
}

async fn handler(req: Request<()>) -> Result<Response<()>, Infallible> {
    let db = req
        .extensions()
        .get::<Db<FakeBackend>>()
        .expect("the layer inserts Db")
        .clone();
    if req.method() == Method::POST {
        db.write();
    }
    let read_pool = *db.read().await;
    let mut response = Response::new(());
    response.extensions_mut().insert(Seen {
        outcome: db.token_outcome(),
        required: db.required_position(),
        read_pool,
    });
    Ok(response)
}

/// `x-user-id: <n>` is user n; `x-user-id: anon` makes the identity
/// function answer with the empty id, which must count as no identity.
fn identify(parts: &http::request::Parts) -> Option<UserId> {
    let text = parts.headers.get("x-user-id")?.to_str().ok()?;
    if text == "anon" {
        return Some(UserId::anonymous());
    }
    Some(UserId::from(text.parse::<u64>().ok()?))
}

/// Drives a future that never waits (the backend answers at once).
fn complete<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..64 {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
    panic!("the layer waited on something; nothing here should");
}

/// One cookie pair or token header value a hostile request may carry.
#[derive(Clone)]
enum Piece {
    /// A valid token of the requester: may win.
    Valid(AffinityToken, String),
    /// Anything that must not win and costs a MAC at most if it names the
    /// requester.
    Forged(String),
    /// Cheap junk: never costs a MAC.
    Junk(String),
    /// The requester's token under a key id the layer does not know (as
    /// during a rolling key rotation): costs no MAC, but is not absent.
    /// Unless the valid tokens promise as much, the clusters it names are
    /// read from the primary.
    Unreadable(AffinityToken, String),
}

impl Piece {
    fn text(&self) -> &str {
        match self {
            Piece::Valid(_, text)
            | Piece::Forged(text)
            | Piece::Junk(text)
            | Piece::Unreadable(_, text) => text,
        }
    }
}

/// A token of `user`, signed with the layer's key, expiring after NOW.
fn valid_piece(rng: &mut Rng, user: u64, keys: &KeySet) -> Piece {
    let token = AffinityToken::new(
        UserId::from(user),
        random_position(rng),
        NOW + 1 + rng.below(3_600) as u64,
    );
    let text = token.sign(NAME, keys);
    Piece::Valid(token, text)
}

fn junk_piece(rng: &mut Rng, user: u64, keys: &KeySet) -> Piece {
    let other_user = user + 1 + rng.below(5) as u64;
    match rng.below(9) {
        0 => Piece::Junk("x".into()),
        1 => Piece::Junk(String::new()),
        2 => Piece::Junk(
            (0..rng.below(120))
                .map(|_| *rng.pick(ALPHABET) as char)
                .collect(),
        ),
        3 => Piece::Junk("A".repeat(MAX_ENCODED_LEN + 1 + rng.below(4_000))),
        // Another user's genuine token.
        4 => match valid_piece(rng, other_user, keys) {
            Piece::Valid(_, text) => Piece::Junk(text),
            piece => piece,
        },
        // The requester's token, expired.
        5 => Piece::Junk(
            AffinityToken::new(
                UserId::from(user),
                random_position(rng),
                NOW - rng.below(100) as u64,
            )
            .sign(NAME, keys),
        ),
        // The requester's token under an unknown key or another name.
        6 => {
            let token = AffinityToken::new(UserId::from(user), random_position(rng), NOW + 60);
            let text = token.sign(NAME, &self::keys(2));
            Piece::Unreadable(token, text)
        }
        7 => Piece::Forged(
            AffinityToken::new(UserId::from(user), random_position(rng), NOW + 60)
                .sign("session", keys),
        ),
        // The requester's token with a flipped tag bit: a well-formed forgery.
        _ => {
            let text = match valid_piece(rng, user, keys) {
                Piece::Valid(_, text) => text,
                piece => return piece,
            };
            let mut raw = URL_SAFE_NO_PAD.decode(text).expect("we encoded it");
            let last = raw.len() - 1 - rng.below(16);
            raw[last] ^= 1 << rng.below(8);
            Piece::Forged(URL_SAFE_NO_PAD.encode(raw))
        }
    }
}

/// The valid token the layer must pick: of the requester's valid tokens in
/// the order the layer reads them (token headers, then cookies), the first
/// that no later one promises more than.
fn best<'a>(valid: impl IntoIterator<Item = &'a AffinityToken>) -> Option<&'a AffinityToken> {
    valid.into_iter().fold(None, |best, token| match best {
        Some(best) if !token.promises_more_than(best) => Some(best),
        _ => Some(token),
    })
}

/// Whether `piece` could cost a MAC for `user`: a well-formed token naming
/// them. Other pieces are refused by the cheap checks.
fn costs_a_mac(piece: &Piece) -> bool {
    matches!(piece, Piece::Valid(..) | Piece::Forged(_))
}

/// One hostile request and what the handler must see: the outcome (`None`:
/// anything but `Valid`), the required position and the pool a read gets.
struct Case {
    request: Request<()>,
    expect: (Option<TokenOutcome>, Option<WritePosition>, &'static str),
    /// More well-formed forgeries naming the requester than the MAC budget:
    /// the documented bound may hide the valid token (then the request reads
    /// like one with only bad tokens, never anything worse).
    may_hide: bool,
    user: Option<u64>,
    writes: bool,
}

/// Users the hostile requests come from.
const USERS: u64 = 16;

/// Pieces and headers made once: signing in a debug build costs more than
/// the layer's work, and the test is about the layer.
struct Pools {
    /// Per user (index `user - 1`): valid tokens and junk.
    valid: Vec<Vec<Piece>>,
    junk: Vec<Vec<Piece>>,
    /// Anonymous tokens, which no identified or unidentified user may use.
    anonymous: Vec<String>,
    /// Garbage `Cookie` header values: non-ASCII, separators, up to 60 KiB.
    garbage: Vec<HeaderValue>,
}

impl Pools {
    fn new(rng: &mut Rng, keys: &KeySet) -> Self {
        let valid = (1..=USERS)
            .map(|user| (0..48).map(|_| valid_piece(rng, user, keys)).collect())
            .collect();
        let junk = (1..=USERS)
            .map(|user| (0..192).map(|_| junk_piece(rng, user, keys)).collect())
            .collect();
        let anonymous = (0..8)
            .map(|_| {
                AffinityToken::new(UserId::anonymous(), random_position(rng), NOW + 60)
                    .sign(NAME, keys)
            })
            .collect();
        let garbage = (0..64)
            .map(|i| {
                let len = match i {
                    0 => 60_000,
                    1..=3 => 16_384,
                    _ => rng.below(2_000),
                };
                // Any byte a header value may hold: every one but the
                // control characters other than tab.
                let bytes: Vec<u8> = rng
                    .bytes(len)
                    .into_iter()
                    .map(|b| {
                        if (b < 0x20 && b != b'\t') || b == 0x7F {
                            b';'
                        } else {
                            b
                        }
                    })
                    .collect();
                HeaderValue::from_bytes(&bytes).expect("no control characters")
            })
            .collect();
        Pools {
            valid,
            junk,
            anonymous,
            garbage,
        }
    }

    fn valid(&self, rng: &mut Rng, user: u64) -> Piece {
        rng.pick(&self.valid[(user - 1) as usize]).clone()
    }

    fn junk(&self, rng: &mut Rng, user: u64) -> Piece {
        rng.pick(&self.junk[(user - 1) as usize]).clone()
    }
}

fn hostile_request(rng: &mut Rng, pools: &Pools) -> Case {
    let user = 1 + rng.below(USERS as usize) as u64;
    let writes = rng.chance(8);
    let mut builder = Request::builder()
        .method(if writes { Method::POST } else { Method::GET })
        .uri("/");
    let scenario = rng.below(8);
    // Who asks: a user, the empty identity, or no identity at all.
    let identity = match scenario {
        6 => None,
        7 => {
            builder = builder.header("x-user-id", "anon");
            None
        }
        _ => {
            builder = builder.header("x-user-id", user.to_string());
            Some(user)
        }
    };

    let mut headers: Vec<Piece> = Vec::new();
    let mut cookies: Vec<Piece> = Vec::new();
    let mut bounded = true;
    match scenario {
        // Junk before and after a valid token, in cookies and headers;
        // sometimes hundreds of junk cookies.
        0 | 1 => {
            let junk = if rng.chance(4) {
                100 + rng.below(300)
            } else {
                rng.below(12)
            };
            let valid = 1 + rng.below(MAX_VALID_PER_REQUEST);
            let mut forged = 0;
            for _ in 0..junk {
                let piece = pools.junk(rng, user);
                if matches!(piece, Piece::Forged(_)) {
                    if forged == MAX_FORGED_PER_REQUEST {
                        continue;
                    }
                    forged += 1;
                }
                if rng.chance(10) {
                    &mut headers
                } else {
                    &mut cookies
                }
                .push(piece);
            }
            for _ in 0..valid {
                let piece = pools.valid(rng, user);
                let list = if rng.chance(4) {
                    &mut headers
                } else {
                    &mut cookies
                };
                let at = rng.below(list.len() + 1);
                list.insert(at, piece);
            }
        }
        // Several valid tokens of the user, duplicated, nothing else.
        2 => {
            for _ in 0..2 + rng.below(MAX_VALID_PER_REQUEST - 1) {
                let piece = pools.valid(rng, user);
                if rng.chance(3) {
                    headers.push(piece.clone());
                }
                cookies.push(piece.clone());
                if rng.chance(3) {
                    cookies.push(piece);
                }
            }
        }
        // Hundreds of well-formed forgeries naming the requester around a
        // valid token: the documented bound may hide it, nothing else may
        // happen.
        3 => {
            bounded = false;
            for _ in 0..rng.below(300) {
                let piece = pools.junk(rng, user);
                cookies.push(if costs_a_mac(&piece) {
                    piece
                } else {
                    pools.junk(rng, user)
                });
            }
            let at = rng.below(cookies.len() + 1);
            cookies.insert(at, pools.valid(rng, user));
        }
        // Other users' tokens only.
        4 => {
            for _ in 0..1 + rng.below(6) {
                let other = 1 + (user + rng.next() % (USERS - 1)) % USERS;
                if let Piece::Valid(_, text) = pools.valid(rng, other) {
                    cookies.push(Piece::Junk(text));
                }
            }
        }
        // Garbage, non-ASCII and huge `Cookie` headers, plus a valid token.
        5 => {
            for _ in 0..1 + rng.below(4) {
                builder = builder.header(COOKIE, rng.pick(&pools.garbage).clone());
            }
            cookies.push(pools.valid(rng, user));
        }
        // No identity, or the empty identity: tokens of anyone, anonymous
        // ones included, are refused.
        _ => {
            let anonymous = rng.pick(&pools.anonymous).clone();
            cookies.push(Piece::Junk(anonymous.clone()));
            headers.push(Piece::Junk(anonymous));
            cookies.push(pools.valid(rng, user));
            cookies.push(pools.junk(rng, user));
        }
    }

    for piece in &headers {
        builder = builder.header(
            DEFAULT_TOKEN_HEADER,
            HeaderValue::from_str(piece.text()).expect("visible ASCII"),
        );
    }
    // Cookies split over one to three headers, HTTP/2 style, with odd
    // spacing and unrelated cookies between them.
    let parts = 1 + rng.below(3);
    for chunk in cookies.chunks(cookies.len().div_ceil(parts).max(1)) {
        let mut text = String::from("theme=dark;");
        for piece in chunk {
            text.push_str(if rng.chance(2) { " " } else { "" });
            text.push_str(NAME);
            text.push('=');
            text.push_str(piece.text());
            text.push(';');
        }
        text.push_str("_ga=GA1.2.3");
        builder = builder.header(COOKIE, text);
    }

    let valid: Vec<&AffinityToken> = headers
        .iter()
        .chain(&cookies)
        .filter_map(|piece| match piece {
            Piece::Valid(token, _) => Some(token),
            _ => None,
        })
        .collect();
    // Valid tokens of different clusters: the layer reads from the primary.
    let clusters_differ = valid.iter().any(|a| {
        valid
            .iter()
            .any(|b| a.position().cmp_promise(&b.position()).is_none())
    });
    // Tokens under an unknown key that promise something the valid ones do
    // not: the backend names no cluster, so any claim may be its own, and
    // its session reads go to the primary.
    let mut carried = Bookmarks::new();
    for token in &valid {
        carried.merge(token.bookmarks());
    }
    let mut claimed = Bookmarks::new();
    for piece in headers.iter().chain(&cookies) {
        if let Piece::Unreadable(token, _) = piece {
            claimed.merge(token.bookmarks());
        }
    }
    let unread = claimed
        .as_slice()
        .iter()
        .any(|claim| !carried.covers(&Bookmarks::one(*claim)));
    let expect = match (identity, best(valid.iter().copied())) {
        (Some(_), Some(token)) => {
            let pinned = token.position().pins_primary() || clusters_differ || unread;
            (
                Some(TokenOutcome::Valid),
                (!pinned).then_some(token.position()),
                if pinned {
                    "primary-pool"
                } else {
                    "replica-pool"
                },
            )
        }
        (Some(_), None) if unread => (
            Some(TokenOutcome::Rejected(TokenError::UnknownKey)),
            None,
            "primary-pool",
        ),
        (None, _) | (Some(_), None) => (None, None, "replica-pool"),
    };
    Case {
        request: builder.body(()).expect("valid request"),
        expect,
        may_hide: !bounded,
        user: identity,
        writes,
    }
}

/// Sends `request` through the layer and times it, handler included (which
/// does next to nothing).
fn time_in_layer<S>(service: &mut S, request: Request<()>) -> (Duration, Response<()>)
where
    S: Service<Request<()>, Response = Response<()>, Error = Infallible>,
{
    let began = Instant::now();
    let response = complete(async {
        let ready = service.ready().await.expect("infallible");
        ready.call(request).await.expect("infallible")
    });
    (began.elapsed(), response)
}

#[test]
fn the_layer_survives_a_hundred_thousand_hostile_requests() {
    let seed = env_u64("HOSTILE_SEED", DEFAULT_SEED);
    let requests = env_u64("HOSTILE_REQUESTS", 100_000);
    let mut rng = Rng(seed ^ 0x0001_A7E2);
    let keys = keys(1);
    let layer = ReadAfterWriteLayer::new(constant_backend(), keys.clone())
        .identity(identify)
        .allow_anonymous(false)
        .clock(ManualClock::new(NOW));
    let mut service = layer.layer(service_fn(handler));
    let pools = Pools::new(&mut rng, &keys);

    // The slowest requests by one timing, as (time, rng state that makes
    // them, shape): re-timed at the end, since one timing on a shared
    // machine may include preemption.
    let mut slowest: Vec<(Duration, u64, String)> = Vec::new();
    let mut total = Duration::ZERO;
    let mut valid = 0u64;
    let mut hidden = 0u64;
    let mut times = Vec::with_capacity(requests as usize);
    let started = Instant::now();
    for n in 0..requests {
        let state = rng.0;
        let case = hostile_request(&mut rng, &pools);
        let shape =
            format!(
            "HOSTILE_SEED={seed} request #{n}: {} Cookie header(s) of {} bytes, {} token header(s)",
            case.request.headers().get_all(COOKIE).iter().count(),
            case.request.headers().get_all(COOKIE).iter().map(|v| v.len()).sum::<usize>(),
            case.request.headers().get_all(DEFAULT_TOKEN_HEADER).iter().count(),
        );
        let (took, response) = time_in_layer(&mut service, case.request);
        total += took;
        times.push(took);
        if slowest.len() < 64 || took > slowest[slowest.len() - 1].0 {
            slowest.push((took, state, shape.clone()));
            slowest.sort_by_key(|(took, ..)| std::cmp::Reverse(*took));
            slowest.truncate(64);
        }

        assert!(!response.status().is_server_error(), "{shape}");
        let seen = response
            .extensions()
            .get::<Seen>()
            .expect("handler ran")
            .clone();
        let (outcome, mut required, mut pool) = case.expect;
        match outcome {
            Some(outcome)
                if case.may_hide && (seen.outcome != outcome || seen.required != required) =>
            {
                // Forgeries used up the MAC budget before the best token:
                // counted by the first refusal (or as valid, when an
                // earlier valid token was checked), and read from the
                // primary, since nothing proves what the user wrote last.
                assert!(
                    matches!(
                        seen.outcome,
                        TokenOutcome::Rejected(_) | TokenOutcome::OtherUser | TokenOutcome::Valid
                    ),
                    "{shape}: {:?}",
                    seen.outcome
                );
                hidden += 1;
                // The budget ran out before the valid token: unknown means
                // unsafe, so the primary.
                (required, pool) = (None, "primary-pool");
            }
            Some(outcome) => assert_eq!(seen.outcome, outcome, "{shape}"),
            None => assert_ne!(seen.outcome, TokenOutcome::Valid, "{shape}"),
        }
        assert_eq!(seen.required, required, "{shape}");
        if !case.writes {
            assert_eq!(seen.read_pool, pool, "{shape}");
        }
        valid += u64::from(seen.outcome == TokenOutcome::Valid);
        let issued = response
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .any(|v| v.as_bytes().starts_with(NAME.as_bytes()));
        assert_eq!(issued, case.writes && case.user.is_some(), "{shape}");
    }
    let elapsed = started.elapsed();
    if times.is_empty() {
        return;
    }
    times.sort_unstable();
    let quantile = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    // The worst cost: the slowest requests re-run, each timed at its best
    // of three.
    let worst = slowest
        .iter()
        .map(|(_, state, shape)| {
            let best = (0..3)
                .map(|_| {
                    time_in_layer(
                        &mut service,
                        hostile_request(&mut Rng(*state), &pools).request,
                    )
                    .0
                })
                .min()
                .unwrap_or_default();
            (best, shape)
        })
        .max_by_key(|(best, _)| *best)
        .expect("at least one request");
    eprintln!(
        "hostile requests: {requests} (seed {seed}, {valid} with a valid token, {hidden} hidden \
         by planted forgeries beyond the MAC budget) in {elapsed:.2?}; time in the layer: \
         mean {:.1?}, p50 {:.1?}, p99 {:.1?}, p99.9 {:.1?}, max {:.2?} (one timing each, on a \
         shared machine); worst re-timed (best of 3, of the 64 slowest): {:.1?} for {}",
        total / requests.max(1) as u32,
        quantile(0.5),
        quantile(0.99),
        quantile(0.999),
        times[times.len() - 1],
        worst.0,
        worst.1,
    );
}

#[test]
fn the_fuzz_oracle_knows_a_genuine_token_from_a_forgery() {
    // The generator's own sanity: its genuine tokens verify, its forgeries
    // do not, so the big loops above judge something.
    let mut rng = Rng(1);
    let keys = keys(1);
    let token = AffinityToken::new(user_of_len(&mut rng, 8), random_position(&mut rng), NOW + 5);
    let text = token.sign(NAME, &keys);
    assert_eq!(
        AffinityToken::verify(&text, NAME, &keys, NOW, token.user()).map(|t| t.position()),
        Ok(token.position())
    );
    let mut raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
    let last = raw.len() - 1;
    raw[last] ^= 1;
    let forged = URL_SAFE_NO_PAD.encode(raw);
    assert_eq!(
        AffinityToken::verify(&forged, NAME, &keys, NOW, token.user()),
        Err(TokenError::BadSignature)
    );
    assert_eq!(colliding_keys().current().id(), keys.current().id());
    assert!(best([&token]).is_some());
}
