//! The signed affinity token: "this user wrote up to this WAL position".
//!
//! # Format (version 2)
//!
//! All integers big-endian; every byte before the tag is covered by it.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version, `2` |
//! | 1 | key id (see [`SigningKey::id`]) |
//! | 1 | user id length `n` (0–255) |
//! | n | user id |
//! | 8 | expiry, Unix seconds |
//! | 1 | bookmark count `m` (1–[`MAX_CLUSTERS`]) |
//! | 28 × m | per cluster: system identifier (8), timeline (4), LSN (8), replica tag (8, 0 for none) |
//! | 16 | tag: HMAC-SHA256 over `name ‖ 0x00 ‖ all bytes above`, first 128 bits |
//!
//! Version 1 tokens (one cluster: LSN, timeline, system identifier, expiry,
//! no replica) are still read, so tokens issued before an upgrade keep
//! their promise; every token issued is version 2.
//!
//! The bytes are encoded as base64url without padding, so the token needs no
//! escaping in a cookie or a header. `name` is the cookie name: a token minted
//! for one cookie does not verify under another. A token for an 8-byte user
//! id and one cluster is 86 characters; each further cluster adds 37 or 38.
//! Anything longer than [`MAX_ENCODED_LEN`] (527, a 255-byte user id and four
//! clusters) is rejected before it is decoded, and parsing never panics.
//!
//! # Checks, cheapest first
//!
//! Verification is two steps. The first needs no key material and allocates
//! nothing: length, base64url, layout, version and expiry, then a key id the
//! [`KeySet`] holds (the layer adds: the user id is the requester's). Only a
//! token that passes all of them costs an HMAC, the second step: one per key
//! with the token's one-byte id. The layer bounds that second step per
//! request (see
//! [`MAX_MACS_PER_REQUEST`](crate::middleware::MAX_MACS_PER_REQUEST)), so
//! junk, however much of it, cannot use up the bound and hide a valid token.
//!
//! A token under a key id the set does not hold is refused here as
//! [`TokenError::UnknownKey`], but the layer does not treat it as absent:
//! during a rolling key rotation it may be another instance's genuine token
//! promising a write (see [`KeySet`] for the procedure, and the
//! [middleware docs](crate::middleware#tokens-the-layer-cannot-read)).
//!
//! # Several tokens
//!
//! A request may carry several valid tokens of one user (a host-only cookie
//! beside a domain cookie, a header beside a cookie). The layer merges them
//! cluster by cluster ([`Bookmarks::merge`](crate::bookmark::Bookmarks::merge)):
//! a bookmark [pinned to the primary](WritePosition::pins_primary) over any
//! position; on one timeline the higher LSN; across timelines the later
//! timeline. A token of one cluster never applies to another.
//!
//! # Example
//!
//! ```
//! use read_after_write::{AffinityToken, KeySet, Lsn, SigningKey, UserId, WritePosition};
//!
//! let keys = KeySet::new(SigningKey::from_bytes(&[7; 32])?);
//! let position = WritePosition::new(Lsn::new(0x16B_3748), 1, 7_301_234_567_890_123_456);
//! let token = AffinityToken::new(UserId::from(42u64), position, 1_700_000_030);
//!
//! let text = token.sign("primary_affinity", &keys);
//! let back = AffinityToken::verify(&text, "primary_affinity", &keys, 1_700_000_000)?;
//! assert_eq!(back.position(), position);
//! assert_eq!(back.user(), &UserId::from(42u64));
//!
//! // Past its expiry, or under another name, it is refused.
//! assert!(AffinityToken::verify(&text, "primary_affinity", &keys, 1_700_000_031).is_err());
//! assert!(AffinityToken::verify(&text, "other", &keys, 1_700_000_000).is_err());
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

mod keys;

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::Mac;
use smallvec::SmallVec;

pub use keys::{KeyError, KeySet, SigningKey};

use crate::bookmark::{Bookmark, Bookmarks, ReplicaTag, MAX_CLUSTERS};
use crate::position::{Lsn, WritePosition};

/// The token format version this crate writes. It reads this one and
/// version 1.
pub const TOKEN_VERSION: u8 = 2;

/// Bytes of HMAC-SHA256 output kept in a token (128 bits).
const TAG_LEN: usize = 16;
/// version, key id, user id length.
const HEAD_LEN: usize = 3;
/// Version 1: LSN, timeline, system identifier, expiry.
const V1_FIXED_LEN: usize = 8 + 4 + 8 + 8;
/// Version 2: expiry, bookmark count.
const V2_FIXED_LEN: usize = 8 + 1;
/// Version 2, per bookmark: system identifier, timeline, LSN, replica tag.
const BOOKMARK_LEN: usize = 8 + 4 + 8 + 8;
/// The longest raw token: a 255-byte user id and [`MAX_CLUSTERS`] bookmarks.
const MAX_RAW_LEN: usize =
    HEAD_LEN + UserId::MAX_LEN + V2_FIXED_LEN + MAX_CLUSTERS * BOOKMARK_LEN + TAG_LEN;
/// The shortest raw token of either version: an empty user id, version 1.
const MIN_RAW_LEN: usize = HEAD_LEN + V1_FIXED_LEN + TAG_LEN;

/// The longest encoded token accepted, in characters (527). Longer input
/// is rejected as [`TokenError::TooLong`] before any decoding.
pub const MAX_ENCODED_LEN: usize = (MAX_RAW_LEN * 4).div_ceil(3);

/// Why a token was refused. Each is a reason to treat the token as absent,
/// but one: a token under a key id this instance does not know
/// ([`UnknownKey`](Self::UnknownKey)) that names the requester and has not
/// expired may promise a write, so the layer reads from the primary instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not base64url, or the bytes do not have the token's layout.
    #[error("affinity token is malformed")]
    Malformed,
    /// The tag does not match: tampered with, or signed for another name.
    #[error("affinity token signature does not verify")]
    BadSignature,
    /// No key in the key set has the token's key id: signed elsewhere, or
    /// by an instance that has rolled out a key rotation this one has not.
    /// Not absent to the layer when it names the requester and is unexpired
    /// (see [`KeySet`] for rotating keys without meeting it).
    #[error(
        "affinity token was signed with a key this server does not have (a key rotation \
         rolled out to some instances only?)"
    )]
    UnknownKey,
    /// The token's expiry has passed.
    #[error("affinity token has expired")]
    Expired,
    /// The token has a format version this crate does not read.
    #[error("affinity token has an unsupported version")]
    WrongVersion,
    /// The token is longer than [`MAX_ENCODED_LEN`].
    #[error("affinity token is longer than any valid token")]
    TooLong,
}

impl TokenError {
    /// A short, stable label for metrics and logs.
    ///
    /// ```
    /// use read_after_write::TokenError;
    ///
    /// assert_eq!(TokenError::BadSignature.as_str(), "bad_signature");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::BadSignature => "bad_signature",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Expired => "expired",
            TokenError::WrongVersion => "wrong_version",
            TokenError::TooLong => "too_long",
        }
    }
}

/// Who a token belongs to: opaque bytes, at most 255 of them.
///
/// Two ids are the same user exactly when their bytes are equal. The
/// conversions give:
///
/// | from | bytes |
/// |---|---|
/// | `u32`, `i32` | 4, big-endian (`to_be_bytes`) |
/// | `u64`, `i64` | 8, big-endian |
/// | `u128` | 16, big-endian |
/// | `&str`, `String` | the UTF-8 bytes (fails past 255) |
/// | `&[u8]`, [`UserId::new`] | the bytes as given (fails past 255) |
///
/// So the width of the integer type is part of the id: **`UserId::from(42i32)`
/// and `UserId::from(42i64)` are different users**, and a token issued under
/// one is ignored under the other (the user silently loses read-your-writes).
/// Pick one type for your ids and convert with it everywhere, typically the
/// type of your database's user id column (`int8`/`bigserial` is `i64`,
/// `int4`/`serial` is `i32`). Signedness does not matter for non-negative
/// ids: `42i64` and `42u64` give the same bytes. Ids of up to 24 bytes are
/// stored inline, without allocating.
///
/// ```
/// use read_after_write::UserId;
///
/// assert_eq!(UserId::from(42i32).as_bytes(), &[0, 0, 0, 42]);
/// assert_eq!(UserId::from(42u32).as_bytes().len(), 4);
/// assert_eq!(UserId::from(42i64).as_bytes(), &42i64.to_be_bytes());
/// assert_eq!(UserId::from(42u64).as_bytes().len(), 8);
/// assert_eq!(UserId::from(42u128).as_bytes().len(), 16);
///
/// // The same number at two widths is two different users.
/// assert_ne!(UserId::from(42i32), UserId::from(42i64));
/// // Signedness alone does not change a non-negative id.
/// assert_eq!(UserId::from(42i64), UserId::from(42u64));
///
/// let b = UserId::try_from("alice@example.com")?;
/// assert_eq!(b.as_bytes(), b"alice@example.com");
/// assert!(UserId::try_from("x".repeat(256).as_str()).is_err());
/// assert!(UserId::anonymous().is_anonymous());
/// # Ok::<_, read_after_write::UserIdTooLong>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct UserId(SmallVec<[u8; 24]>);

/// A user id was longer than [`UserId::MAX_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("user id is {len} bytes; affinity tokens carry at most 255 (hash longer ids first)")]
pub struct UserIdTooLong {
    /// Length of the rejected id in bytes.
    pub len: usize,
}

impl UserId {
    /// The longest id a token can carry, in bytes.
    pub const MAX_LEN: usize = 255;

    /// The empty id used for requests without an identity, when anonymous
    /// tokens are allowed.
    pub fn anonymous() -> Self {
        UserId(SmallVec::new())
    }

    /// An id from raw bytes.
    ///
    /// ```
    /// use read_after_write::UserId;
    ///
    /// assert_eq!(UserId::new(b"u-1")?.as_bytes(), b"u-1");
    /// # Ok::<_, read_after_write::UserIdTooLong>(())
    /// ```
    pub fn new(bytes: &[u8]) -> Result<Self, UserIdTooLong> {
        if bytes.len() > Self::MAX_LEN {
            return Err(UserIdTooLong { len: bytes.len() });
        }
        Ok(UserId(SmallVec::from_slice(bytes)))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether this is the [anonymous](Self::anonymous) id.
    pub fn is_anonymous(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if !text.is_empty() && text.chars().all(|c| !c.is_control()) => {
                write!(f, "UserId({text:?})")
            }
            _ => write!(f, "UserId({:02x?})", self.0.as_slice()),
        }
    }
}

macro_rules! user_id_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for UserId {
            fn from(id: $t) -> Self {
                UserId(SmallVec::from_slice(&id.to_be_bytes()))
            }
        }
    )*};
}
user_id_from_int!(u32, i32, u64, i64, u128);

impl TryFrom<&[u8]> for UserId {
    type Error = UserIdTooLong;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        UserId::new(bytes)
    }
}

impl TryFrom<&str> for UserId {
    type Error = UserIdTooLong;
    fn try_from(text: &str) -> Result<Self, Self::Error> {
        UserId::new(text.as_bytes())
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdTooLong;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        UserId::new(text.as_bytes())
    }
}

/// A decoded affinity token: who it belongs to, what the session's reads
/// must include in each cluster (its [bookmarks](crate::bookmark)), valid
/// until when, and which key signed it.
///
/// Build one with [`new`](Self::new) or [`with_bookmarks`](Self::with_bookmarks)
/// and [`sign`](Self::sign) it; read one with [`verify`](Self::verify). The
/// layer does both for you; use this type directly to mint tokens elsewhere,
/// for example in a gRPC client test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinityToken {
    version: u8,
    key_id: u8,
    user: UserId,
    /// At least one, at most [`MAX_CLUSTERS`], one per cluster.
    bookmarks: Bookmarks,
    expires_at: u64,
}

/// A token was given no bookmark, or more clusters than
/// [`MAX_CLUSTERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a token covers 1 to {MAX_CLUSTERS} clusters")]
pub struct BookmarkCountError;

impl AffinityToken {
    /// A token promising `position` to `user` until `expires_at` (Unix
    /// seconds). The key id is set when it is signed.
    pub fn new(user: UserId, position: WritePosition, expires_at: u64) -> Self {
        AffinityToken {
            version: TOKEN_VERSION,
            key_id: 0,
            user,
            bookmarks: Bookmarks::one(Bookmark::new(position)),
            expires_at,
        }
    }

    /// A token carrying `bookmarks`, one per cluster, 1 to
    /// [`MAX_CLUSTERS`] of them.
    ///
    /// ```
    /// use read_after_write::bookmark::{Bookmark, Bookmarks};
    /// use read_after_write::{AffinityToken, KeySet, Lsn, SigningKey, UserId, WritePosition};
    ///
    /// let mut bookmarks = Bookmarks::new();
    /// bookmarks.set(Bookmark::new(WritePosition::new(Lsn::new(0x100), 1, 7)));
    /// bookmarks.set(Bookmark::new(WritePosition::new(Lsn::new(0x900), 3, 8)));
    /// let token = AffinityToken::with_bookmarks(UserId::from(1u64), bookmarks, 99)?;
    ///
    /// let keys = KeySet::new(SigningKey::from_bytes(&[7; 32])?);
    /// let back = AffinityToken::verify(&token.sign("a", &keys), "a", &keys, 0)?;
    /// assert_eq!(back.bookmark(8).unwrap().position.lsn, Lsn::new(0x900));
    /// # Ok::<_, Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_bookmarks(
        user: UserId,
        bookmarks: Bookmarks,
        expires_at: u64,
    ) -> Result<Self, BookmarkCountError> {
        if bookmarks.is_empty() || bookmarks.len() > MAX_CLUSTERS {
            return Err(BookmarkCountError);
        }
        Ok(AffinityToken {
            version: TOKEN_VERSION,
            key_id: 0,
            user,
            bookmarks,
            expires_at,
        })
    }

    /// The format version it was decoded from, or [`TOKEN_VERSION`] for a
    /// token built here.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Id of the key that signed the token (0 before it is signed).
    pub fn key_id(&self) -> u8 {
        self.key_id
    }

    /// The user the token belongs to.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The first bookmark's position: the one position of a single-cluster
    /// token.
    pub fn position(&self) -> WritePosition {
        self.bookmarks
            .as_slice()
            .first()
            .map(|b| b.position)
            .unwrap_or_default()
    }

    /// Every bookmark, one per cluster.
    pub fn bookmarks(&self) -> &Bookmarks {
        &self.bookmarks
    }

    /// The bookmark of the cluster `system_id`.
    pub fn bookmark(&self, system_id: u64) -> Option<&Bookmark> {
        self.bookmarks.get(system_id)
    }

    /// Expiry in Unix seconds; the token is valid while `now < expires_at`.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Signs with the set's current key, binding the token to `name` (the
    /// cookie name), and returns it as base64url without padding. Always in
    /// the current format, [`TOKEN_VERSION`].
    pub fn sign(&self, name: &str, keys: &KeySet) -> String {
        let key = keys.current();
        let mut raw: SmallVec<[u8; 128]> = SmallVec::new();
        raw.push(TOKEN_VERSION);
        raw.push(key.id());
        // UserId guarantees at most 255 bytes.
        raw.push(self.user.0.len() as u8);
        raw.extend_from_slice(&self.user.0);
        raw.extend_from_slice(&self.expires_at.to_be_bytes());
        // Constructors keep 1..=MAX_CLUSTERS bookmarks.
        raw.push(self.bookmarks.len() as u8);
        for bookmark in self.bookmarks.as_slice() {
            raw.extend_from_slice(&bookmark.position.system_id.to_be_bytes());
            raw.extend_from_slice(&bookmark.position.timeline.to_be_bytes());
            raw.extend_from_slice(&bookmark.position.lsn.as_u64().to_be_bytes());
            raw.extend_from_slice(&bookmark.replica.map_or(0, ReplicaTag::get).to_be_bytes());
        }
        let mut mac = key.mac();
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(&raw);
        let tag = mac.finalize().into_bytes();
        raw.extend_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(&raw)
    }

    /// Checks a token's length, encoding, layout, version, expiry against
    /// `now_unix` and key id, then its tag (in constant time, under each key
    /// with the token's id), in that order, and decodes it. Reads versions 1
    /// and 2.
    ///
    /// Never panics, whatever `text` holds. A forged token that also fails
    /// an earlier check is refused for that earlier reason: only a token that
    /// would otherwise be accepted costs an HMAC. An expired token is
    /// [`Expired`](TokenError::Expired) whichever key signed it.
    ///
    /// ```
    /// use read_after_write::{AffinityToken, KeySet, SigningKey, TokenError};
    ///
    /// let keys = KeySet::new(SigningKey::from_bytes(&[7; 32])?);
    /// let err = AffinityToken::verify("not a token", "primary_affinity", &keys, 0);
    /// assert_eq!(err, Err(TokenError::Malformed));
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn verify(
        text: &str,
        name: &str,
        keys: &KeySet,
        now_unix: u64,
    ) -> Result<Self, TokenError> {
        let mut buffer = TokenBuffer::new();
        let token = UnverifiedToken::parse(text, now_unix, &mut buffer)?;
        if !keys.knows(token.key_id()) {
            return Err(TokenError::UnknownKey);
        }
        // One caller, one token: no budget but the key list's.
        match token.authenticate(name, keys, &mut MacBudget::new(usize::MAX)) {
            Checked::Authentic(token) => Ok(token),
            Checked::Forged | Checked::Unchecked => Err(TokenError::BadSignature),
        }
    }

    /// Whether this token promises more than `other`, so that of two valid
    /// tokens of one user this one should decide where reads go.
    ///
    /// Where one token's bookmarks [cover](Bookmarks::covers) the other's
    /// and not the reverse, that one. Otherwise (equal, or each promising
    /// something the other does not, as tokens of different clusters do)
    /// the later expiry wins. Strict: a token never promises more than
    /// itself. The layer does not pick one of several tokens: it merges
    /// them ([`Bookmarks::merge`]).
    ///
    /// ```
    /// use read_after_write::{AffinityToken, Lsn, UserId, WritePosition};
    ///
    /// let user = UserId::from(1u64);
    /// let at = |lsn, timeline, system| WritePosition::new(Lsn::new(lsn), timeline, system);
    /// let token = |position, expires_at| AffinityToken::new(user.clone(), position, expires_at);
    ///
    /// // One cluster and timeline: the higher LSN, whatever the expiry.
    /// assert!(token(at(0x300, 1, 7), 10).promises_more_than(&token(at(0x100, 1, 7), 99)));
    /// // One cluster, another timeline: the later timeline.
    /// assert!(token(at(0x1, 2, 7), 10).promises_more_than(&token(at(0x900, 1, 7), 99)));
    /// // Different clusters: the later expiry.
    /// assert!(token(at(0x1, 1, 8), 99).promises_more_than(&token(at(0x900, 1, 7), 10)));
    /// // Pinned to the primary: more than any position.
    /// assert!(token(WritePosition::default(), 10).promises_more_than(&token(at(0x900, 1, 7), 99)));
    /// ```
    pub fn promises_more_than(&self, other: &AffinityToken) -> bool {
        promises_more(
            (&self.bookmarks, self.expires_at),
            (&other.bookmarks, other.expires_at),
        )
    }
}

/// Whether `(bookmarks, expires_at)` promises more than `other`; see
/// [`AffinityToken::promises_more_than`]. The all-zero position (version 1's
/// pin) covers every cluster.
fn promises_more(this: (&Bookmarks, u64), other: (&Bookmarks, u64)) -> bool {
    let covers = |a: &Bookmarks, b: &Bookmarks| {
        a.as_slice()
            .iter()
            .any(|m| m.position == WritePosition::default())
            || a.covers(b)
    };
    match (covers(this.0, other.0), covers(other.0, this.0)) {
        (true, false) => true,
        (false, true) => false,
        _ => this.1 > other.1,
    }
}

/// Room for a decoded token, on the caller's stack: parsing borrows it
/// rather than moving ~400 bytes around with every result.
pub(crate) struct TokenBuffer([u8; MAX_RAW_LEN]);

impl TokenBuffer {
    pub(crate) fn new() -> Self {
        TokenBuffer([0; MAX_RAW_LEN])
    }
}

/// How many more MACs a caller may compute: each key tried for a token is
/// one, whatever the tokens and however many keys share an id.
pub(crate) struct MacBudget {
    left: usize,
}

impl MacBudget {
    pub(crate) fn new(macs: usize) -> Self {
        MacBudget { left: macs }
    }

    /// Takes one MAC from the budget; false, taking nothing, once it is
    /// spent.
    fn take(&mut self) -> bool {
        let Some(left) = self.left.checked_sub(1) else {
            return false;
        };
        self.left = left;
        true
    }
}

/// What [`UnverifiedToken::authenticate`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Checked {
    /// The tag matched a key with the token's id.
    Authentic(AffinityToken),
    /// Every key with the token's id was tried; none matched.
    Forged,
    /// The budget ran out before every key with the token's id was tried:
    /// the token may be genuine.
    Unchecked,
}

/// A token that passed every check needing no key: length, encoding,
/// layout, version and expiry. Whether its key id is known is the caller's
/// to ask ([`key_id`](Self::key_id)), since a token under an unknown key is
/// not the same as no token. Its fields are attacker controlled until
/// [`authenticate`](Self::authenticate) succeeds; use them only to decide
/// whether the MAC is worth computing, or what an unreadable token may
/// promise.
pub(crate) struct UnverifiedToken<'a> {
    /// The decoded bytes; [`parse`](Self::parse) checked their layout for
    /// the version in the first byte.
    raw: &'a [u8],
}

impl<'a> UnverifiedToken<'a> {
    /// The cheap checks, in the order [`AffinityToken::verify`] documents,
    /// up to the key id, decoding into `buffer`. Linear in `text.len()`
    /// (which is at most [`MAX_ENCODED_LEN`] by the first check), allocation
    /// free, and never panics.
    pub(crate) fn parse(
        text: &str,
        now_unix: u64,
        buffer: &'a mut TokenBuffer,
    ) -> Result<Self, TokenError> {
        if text.len() > MAX_ENCODED_LEN {
            return Err(TokenError::TooLong);
        }
        let len = URL_SAFE_NO_PAD
            .decode_slice(text.as_bytes(), &mut buffer.0)
            .map_err(|_| TokenError::Malformed)?;
        let raw = &buffer.0[..len];
        if len < MIN_RAW_LEN {
            return Err(TokenError::Malformed);
        }
        let body = HEAD_LEN + usize::from(raw[2]);
        let expected = match raw[0] {
            1 => body + V1_FIXED_LEN + TAG_LEN,
            2 => {
                // The count byte sits after the user id and the expiry,
                // which a short token may not reach.
                let Some(&count) = raw.get(body + 8) else {
                    return Err(TokenError::Malformed);
                };
                let count = usize::from(count);
                if count == 0 || count > MAX_CLUSTERS {
                    return Err(TokenError::Malformed);
                }
                body + V2_FIXED_LEN + count * BOOKMARK_LEN + TAG_LEN
            }
            _ => return Err(TokenError::WrongVersion),
        };
        if len != expected {
            return Err(TokenError::Malformed);
        }
        let token = UnverifiedToken { raw };
        if now_unix >= token.expires_at() {
            return Err(TokenError::Expired);
        }
        Ok(token)
    }

    fn version(&self) -> u8 {
        self.raw[0]
    }

    /// The id of the key the token claims to be signed with.
    pub(crate) fn key_id(&self) -> u8 {
        self.raw[1]
    }

    /// Where the fields after the user id start.
    fn body(&self) -> usize {
        HEAD_LEN + usize::from(self.raw[2])
    }

    /// The user id the token claims.
    pub(crate) fn user(&self) -> &[u8] {
        &self.raw[HEAD_LEN..self.body()]
    }

    /// The bookmarks the token claims.
    pub(crate) fn bookmarks(&self) -> Bookmarks {
        let at = self.body();
        if self.version() == 1 {
            let fixed = &self.raw[at..at + V1_FIXED_LEN];
            return Bookmarks::one(Bookmark::new(WritePosition::new(
                Lsn::new(u64::from_be_bytes(array(&fixed[0..8]))),
                u32::from_be_bytes(array(&fixed[8..12])),
                u64::from_be_bytes(array(&fixed[12..20])),
            )));
        }
        let entries = &self.raw[at + V2_FIXED_LEN..self.raw.len() - TAG_LEN];
        let mut bookmarks = Bookmarks::new();
        for entry in entries.chunks_exact(BOOKMARK_LEN) {
            let bookmark = Bookmark {
                position: WritePosition::new(
                    Lsn::new(u64::from_be_bytes(array(&entry[12..20]))),
                    u32::from_be_bytes(array(&entry[8..12])),
                    u64::from_be_bytes(array(&entry[0..8])),
                ),
                replica: ReplicaTag::new(u64::from_be_bytes(array(&entry[20..28]))),
            };
            // Two bookmarks of one cluster: keep what both promise.
            let merged = match bookmarks.get(bookmark.system_id()) {
                Some(seen) => seen.merge(&bookmark),
                None => bookmark,
            };
            bookmarks.set(merged);
        }
        bookmarks
    }

    /// The expiry the token claims, Unix seconds.
    pub(crate) fn expires_at(&self) -> u64 {
        let at = match self.version() {
            1 => self.body() + 20,
            _ => self.body(),
        };
        u64::from_be_bytes(array(&self.raw[at..at + 8]))
    }

    /// Whether, if authentic, this token would add to what `known`
    /// already promises.
    pub(crate) fn adds_to(&self, known: &Bookmarks) -> bool {
        !known.covers(&self.bookmarks())
    }

    /// Checks the tag (HMAC-SHA256 over `name ‖ 0x00 ‖ payload`, compared
    /// in constant time) against each key with the token's id, one MAC of
    /// `budget` per key tried. Ids are one byte, so several keys may share
    /// one: counting keys, not tokens, keeps the budget a bound on work
    /// whatever the key list.
    pub(crate) fn authenticate(
        &self,
        name: &str,
        keys: &KeySet,
        budget: &mut MacBudget,
    ) -> Checked {
        let (payload, tag) = self.raw.split_at(self.raw.len() - TAG_LEN);
        for key in keys.with_id(self.key_id()) {
            if !budget.take() {
                return Checked::Unchecked;
            }
            #[cfg(test)]
            MACS.with(|macs| macs.set(macs.get() + 1));
            let mut mac = key.mac();
            mac.update(name.as_bytes());
            mac.update(&[0]);
            mac.update(payload);
            if mac.verify_truncated_left(tag).is_ok() {
                return Checked::Authentic(AffinityToken {
                    version: self.version(),
                    key_id: self.key_id(),
                    user: UserId(SmallVec::from_slice(self.user())),
                    bookmarks: self.bookmarks(),
                    expires_at: self.expires_at(),
                });
            }
        }
        Checked::Forged
    }
}

#[cfg(test)]
thread_local! {
    /// MACs computed on this thread, for tests of the budget.
    static MACS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// MACs computed on this thread so far (tests only).
#[cfg(test)]
pub(crate) fn macs_computed() -> usize {
    MACS.with(std::cell::Cell::get)
}

/// Copies a slice whose length the caller has already checked.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NAME: &str = "primary_affinity";
    const NOW: u64 = 1_700_000_000;

    fn keys(byte: u8) -> KeySet {
        KeySet::new(SigningKey::from_bytes(&[byte; 32]).unwrap())
    }

    fn sample(user: u64) -> AffinityToken {
        let position =
            WritePosition::new(Lsn::new(0x0000_0001_0203_0405), 3, 0xDEAD_BEEF_0000_0001);
        AffinityToken::new(UserId::from(user), position, NOW + 30)
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let keys = keys(1);
        let token = sample(42);
        let text = token.sign(NAME, &keys);
        assert!(text.len() < 100, "{} chars", text.len());
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let back = AffinityToken::verify(&text, NAME, &keys, NOW).unwrap();
        assert_eq!(back.user(), token.user());
        assert_eq!(back.position(), token.position());
        assert_eq!(back.expires_at(), token.expires_at());
        assert_eq!(back.key_id(), keys.current().id());
        assert_eq!(back.version(), TOKEN_VERSION);
    }

    #[test]
    fn longest_user_id_round_trips_and_fits_the_limit() {
        let keys = keys(1);
        let user = UserId::new(&[0xAB; 255]).unwrap();
        let mut bookmarks = Bookmarks::new();
        for system in 1..=MAX_CLUSTERS as u64 {
            let at = WritePosition::new(Lsn::new(u64::MAX), u32::MAX, system);
            bookmarks.set(Bookmark::new(at).on_replica(ReplicaTag::new(u64::MAX).unwrap()));
        }
        let token = AffinityToken::with_bookmarks(user.clone(), bookmarks, NOW + 1).unwrap();
        let text = token.sign(NAME, &keys);
        assert_eq!(text.len(), MAX_ENCODED_LEN);
        assert_eq!(MAX_ENCODED_LEN, 527);
        // A fifth cluster does not fit in a token at all.
        let mut five = token.bookmarks().clone();
        assert!(!five.set(Bookmark::new(WritePosition::new(Lsn::new(1), 1, 99))));
        assert_eq!(
            AffinityToken::verify(&text, NAME, &keys, NOW)
                .unwrap()
                .user(),
            &user
        );
    }

    #[test]
    fn every_single_byte_tamper_is_rejected() {
        let keys = keys(1);
        let text = sample(7).sign(NAME, &keys);
        let raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        for i in 0..raw.len() {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut tampered = raw.clone();
                tampered[i] ^= flip;
                let forged = URL_SAFE_NO_PAD.encode(&tampered);
                assert!(
                    AffinityToken::verify(&forged, NAME, &keys, NOW).is_err(),
                    "byte {i} ^ {flip:#x} verified"
                );
            }
        }
        // And at the text level: every character replaced by every other.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for i in 0..text.len() {
            for &c in alphabet {
                if text.as_bytes()[i] == c {
                    continue;
                }
                let mut forged = text.clone().into_bytes();
                forged[i] = c;
                let forged = String::from_utf8(forged).unwrap();
                assert!(
                    AffinityToken::verify(&forged, NAME, &keys, NOW).is_err(),
                    "char {i} -> {}",
                    c as char
                );
            }
        }
    }

    #[test]
    fn wrong_key_other_name_and_expiry_are_refused_by_reason() {
        let text = sample(1).sign(NAME, &keys(1));
        // A different key with a different id, and one forced to share the id.
        let other = keys(2);
        let outcome = AffinityToken::verify(&text, NAME, &other, NOW).unwrap_err();
        if other.current().id() == keys(1).current().id() {
            assert_eq!(outcome, TokenError::BadSignature);
        } else {
            assert_eq!(outcome, TokenError::UnknownKey);
        }
        let same_id = (3u8..=255)
            .map(keys)
            .find(|k| k.current().id() == keys(1).current().id())
            .expect("some key shares a one-byte id");
        assert_eq!(
            AffinityToken::verify(&text, NAME, &same_id, NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            AffinityToken::verify(&text, "session", &keys(1), NOW),
            Err(TokenError::BadSignature)
        );
        assert!(AffinityToken::verify(&text, NAME, &keys(1), NOW + 29).is_ok());
        assert_eq!(
            AffinityToken::verify(&text, NAME, &keys(1), NOW + 30),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn oversize_garbage_and_foreign_versions_are_refused() {
        let keys = keys(1);
        let long = "A".repeat(MAX_ENCODED_LEN + 1);
        assert_eq!(
            AffinityToken::verify(&long, NAME, &keys, NOW),
            Err(TokenError::TooLong)
        );
        let huge = "A".repeat(1 << 20);
        assert_eq!(
            AffinityToken::verify(&huge, NAME, &keys, NOW),
            Err(TokenError::TooLong)
        );
        for junk in [
            "",
            "=",
            "AAAA=",
            "a b",
            "🍪",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(
                AffinityToken::verify(junk, NAME, &keys, NOW).is_err(),
                "{junk:?}"
            );
        }
        let mut raw = URL_SAFE_NO_PAD.decode(sample(1).sign(NAME, &keys)).unwrap();
        raw[0] = 3;
        assert_eq!(
            AffinityToken::verify(&URL_SAFE_NO_PAD.encode(&raw), NAME, &keys, NOW),
            Err(TokenError::WrongVersion)
        );
        // A user-length byte that disagrees with the real length.
        let mut raw = URL_SAFE_NO_PAD.decode(sample(1).sign(NAME, &keys)).unwrap();
        raw[2] = 200;
        assert_eq!(
            AffinityToken::verify(&URL_SAFE_NO_PAD.encode(&raw), NAME, &keys, NOW),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn previous_keys_still_verify_after_rotation() {
        let old = SigningKey::from_bytes(&[1; 32]).unwrap();
        let new = SigningKey::from_bytes(&[2; 32]).unwrap();
        let text = sample(5).sign(NAME, &KeySet::new(old.clone()));
        let rotated = KeySet::new(new.clone()).with_previous(old.clone());
        let back = AffinityToken::verify(&text, NAME, &rotated, NOW).unwrap();
        assert_eq!(back.key_id(), old.id());
        let resigned = back.sign(NAME, &rotated);
        assert_eq!(
            AffinityToken::verify(&resigned, NAME, &rotated, NOW)
                .unwrap()
                .key_id(),
            new.id()
        );
        // Once the old key is dropped, its tokens stop verifying.
        assert!(AffinityToken::verify(&text, NAME, &KeySet::new(new), NOW).is_err());
    }

    /// A version 1 token, as this crate signed them before version 2.
    fn sign_v1(user: &UserId, position: WritePosition, expires_at: u64, keys: &KeySet) -> String {
        let key = keys.current();
        let mut raw = vec![1, key.id(), user.as_bytes().len() as u8];
        raw.extend_from_slice(user.as_bytes());
        raw.extend_from_slice(&position.lsn.as_u64().to_be_bytes());
        raw.extend_from_slice(&position.timeline.to_be_bytes());
        raw.extend_from_slice(&position.system_id.to_be_bytes());
        raw.extend_from_slice(&expires_at.to_be_bytes());
        let mut mac = key.mac();
        mac.update(NAME.as_bytes());
        mac.update(&[0]);
        mac.update(&raw);
        raw.extend_from_slice(&mac.finalize().into_bytes()[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(&raw)
    }

    #[test]
    fn version_1_tokens_keep_their_promise() {
        let keys = keys(1);
        let user = UserId::from(5u64);
        let position = WritePosition::new(Lsn::new(0x1_6B37_4800), 2, 77);
        let text = sign_v1(&user, position, NOW + 30, &keys);
        assert_eq!(text.len(), 74, "the documented length of a v1 token");
        let token = AffinityToken::verify(&text, NAME, &keys, NOW).unwrap();
        assert_eq!(token.version(), 1);
        assert_eq!(token.position(), position);
        assert_eq!(token.bookmarks(), &Bookmarks::one(Bookmark::new(position)));
        assert_eq!(token.expires_at(), NOW + 30);
        assert_eq!(
            AffinityToken::verify(&text, NAME, &keys, NOW + 30),
            Err(TokenError::Expired)
        );
        // Re-signed, it is version 2 and promises the same.
        let again = AffinityToken::verify(&token.sign(NAME, &keys), NAME, &keys, NOW).unwrap();
        assert_eq!((again.version(), again.bookmarks()), (2, token.bookmarks()));
        // A tampered v1 token fails its MAC.
        let mut raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        raw[12] ^= 1;
        assert_eq!(
            AffinityToken::verify(&URL_SAFE_NO_PAD.encode(&raw), NAME, &keys, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_bookmark_count_out_of_range_is_malformed() {
        let keys = keys(1);
        let text = sample(1).sign(NAME, &keys);
        let raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        let count_at = HEAD_LEN + 8 + 8;
        assert_eq!(raw[count_at], 1);
        for count in [0u8, 2, 5, 255] {
            let mut bad = raw.clone();
            bad[count_at] = count;
            assert_eq!(
                AffinityToken::verify(&URL_SAFE_NO_PAD.encode(&bad), NAME, &keys, NOW),
                Err(TokenError::Malformed),
                "count {count}"
            );
        }
        assert_eq!(
            AffinityToken::with_bookmarks(UserId::from(1u64), Bookmarks::new(), NOW),
            Err(BookmarkCountError)
        );
    }

    #[test]
    fn cheap_checks_come_before_the_mac() {
        let other = keys(2);
        let keys = keys(1);
        let text = sample(7).sign(NAME, &keys);
        let mut raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        let tag_start = raw.len() - TAG_LEN;
        raw[tag_start] ^= 1;
        let forged = URL_SAFE_NO_PAD.encode(&raw);
        // A bad tag passes every check that needs no MAC...
        let mut buffer = TokenBuffer::new();
        let unverified = UnverifiedToken::parse(&forged, NOW, &mut buffer).unwrap();
        assert_eq!(unverified.user(), UserId::from(7u64).as_bytes());
        assert_eq!(unverified.bookmarks(), *sample(7).bookmarks());
        assert_eq!(unverified.expires_at(), NOW + 30);
        assert_eq!(unverified.key_id(), keys.current().id());
        let before = macs_computed();
        assert_eq!(
            unverified.authenticate(NAME, &keys, &mut MacBudget::new(1)),
            Checked::Forged
        );
        assert_eq!(macs_computed(), before + 1);
        // ...and an expired forgery is refused as expired, before any MAC,
        // whichever key it names.
        assert_eq!(
            AffinityToken::verify(&forged, NAME, &keys, NOW + 30),
            Err(TokenError::Expired)
        );
        assert_eq!(
            AffinityToken::verify(&forged, NAME, &other, NOW + 30),
            Err(TokenError::Expired)
        );
        assert_eq!(macs_computed(), before + 1);
        // The key id is the caller's to check: parsing does not need keys.
        assert!(UnverifiedToken::parse(&forged, NOW, &mut TokenBuffer::new()).is_ok());
        assert_eq!(
            other.knows(keys.current().id()),
            other.current().id() == keys.current().id()
        );
        let mut buffer = TokenBuffer::new();
        let genuine = UnverifiedToken::parse(&text, NOW, &mut buffer).unwrap();
        assert_eq!(
            genuine.authenticate(NAME, &keys, &mut MacBudget::new(0)),
            Checked::Unchecked,
            "no budget, no MAC"
        );
        assert_eq!(macs_computed(), before + 1);
        assert_eq!(
            genuine.authenticate(NAME, &keys, &mut MacBudget::new(1)),
            Checked::Authentic(AffinityToken {
                key_id: keys.current().id(),
                ..sample(7)
            })
        );
    }

    #[test]
    fn every_key_sharing_the_id_costs_a_mac_of_the_budget() {
        // Three keys with one id: ids are one byte, so some among a few
        // hundred keys share one.
        let mut by_id: Vec<Vec<SigningKey>> = vec![Vec::new(); 256];
        let sharing = (0u16..)
            .find_map(|n| {
                let mut bytes = [0x5A; 32];
                bytes[..2].copy_from_slice(&n.to_be_bytes());
                let key = SigningKey::from_bytes(&bytes).unwrap();
                let same = &mut by_id[usize::from(key.id())];
                same.push(key);
                (same.len() == 3).then(|| same.clone())
            })
            .unwrap();
        // Signed with the last of the three.
        let set = KeySet::new(sharing[0].clone())
            .with_previous(sharing[1].clone())
            .with_previous(sharing[2].clone());
        let text = sample(7).sign(NAME, &KeySet::new(sharing[2].clone()));
        let mut buffer = TokenBuffer::new();
        let token = UnverifiedToken::parse(&text, NOW, &mut buffer).unwrap();
        let mut budget = MacBudget::new(2);
        assert_eq!(
            token.authenticate(NAME, &set, &mut budget),
            Checked::Unchecked
        );
        assert!(!budget.take(), "both MACs spent on the first two keys");
        let mut budget = MacBudget::new(3);
        assert!(matches!(
            token.authenticate(NAME, &set, &mut budget),
            Checked::Authentic(_)
        ));
        assert!(AffinityToken::verify(&text, NAME, &set, NOW).is_ok());
    }

    #[test]
    fn promise_comparison_follows_the_rules() {
        let at = |lsn: u64, timeline: u32, system: u64| {
            AffinityToken::new(
                UserId::from(1u64),
                WritePosition::new(Lsn::new(lsn), timeline, system),
                NOW,
            )
        };
        let expiring = |mut token: AffinityToken, expires_at: u64| {
            token.expires_at = expires_at;
            token
        };
        let pinned = AffinityToken::new(UserId::from(1u64), WritePosition::default(), NOW);
        let cases = [
            // (more, less)
            (at(0x300, 1, 7), expiring(at(0x100, 1, 7), NOW + 99)),
            (at(0x1, 2, 7), expiring(at(0x900, 1, 7), NOW + 99)),
            (expiring(at(0x1, 1, 8), NOW + 1), at(0x900, 1, 7)),
            (expiring(at(0x100, 1, 7), NOW + 1), at(0x100, 1, 7)),
            (
                pinned.clone(),
                expiring(at(u64::MAX, u32::MAX, u64::MAX), NOW + 99),
            ),
            (expiring(pinned.clone(), NOW + 1), pinned.clone()),
        ];
        for (more, less) in cases {
            assert!(more.promises_more_than(&less), "{more:?} > {less:?}");
            assert!(!less.promises_more_than(&more), "{less:?} < {more:?}");
            assert!(!more.promises_more_than(&more), "strict");
        }
        // Position 0/0 on a real timeline is a position, not "pinned".
        assert!(!WritePosition::new(Lsn::ZERO, 1, 7).pins_primary());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn at_most_one_of_two_tokens_promises_more(
            a in (any::<u64>(), 0u32..3, 0u64..3, 0u64..3),
            b in (any::<u64>(), 0u32..3, 0u64..3, 0u64..3),
        ) {
            let token = |(lsn, timeline, system, expiry): (u64, u32, u64, u64)| {
                AffinityToken::new(
                    UserId::from(1u64),
                    WritePosition::new(Lsn::new(lsn % 4), timeline, system),
                    NOW + expiry,
                )
            };
            let (a, b) = (token(a), token(b));
            prop_assert!(!(a.promises_more_than(&b) && b.promises_more_than(&a)));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,600}") {
            let _ = AffinityToken::verify(&text, NAME, &keys(1), NOW);
        }

        #[test]
        fn arbitrary_base64_bytes_never_verify(bytes in proptest::collection::vec(any::<u8>(), 0..320)) {
            let text = URL_SAFE_NO_PAD.encode(&bytes);
            prop_assert!(AffinityToken::verify(&text, NAME, &keys(1), NOW).is_err());
        }

        #[test]
        fn no_mutation_of_a_valid_token_verifies(
            user in proptest::collection::vec(any::<u8>(), 0..=255),
            lsn in any::<u64>(),
            timeline in any::<u32>(),
            system in any::<u64>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            truncate in proptest::option::of(any::<usize>()),
            extra in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let keys = keys(1);
            let token = AffinityToken::new(
                UserId::new(&user).unwrap(),
                WritePosition::new(Lsn::new(lsn), timeline, system),
                NOW + 60,
            );
            let original = URL_SAFE_NO_PAD.decode(token.sign(NAME, &keys)).unwrap();
            let mut raw = original.clone();
            for (at, xor) in edits {
                let at = at % raw.len();
                raw[at] ^= xor;
            }
            if let Some(cut) = truncate {
                raw.truncate(cut % (raw.len() + 1));
            }
            raw.extend_from_slice(&extra);
            prop_assume!(raw != original);
            let forged = URL_SAFE_NO_PAD.encode(&raw);
            prop_assert!(AffinityToken::verify(&forged, NAME, &keys, NOW).is_err());
        }
    }
}
