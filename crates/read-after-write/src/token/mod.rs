//! The signed affinity token: "this user wrote up to this WAL position".
//!
//! # Format (version 3)
//!
//! All integers big-endian; every byte before the MAC is covered by it.
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version, `3` |
//! | 1 | key id (see [`SigningKey::id`]) |
//! | 8 | user tag: SipHash-2-4 of the user id's length and bytes, keyed by a key derived from the signing key |
//! | 8 | expiry, Unix seconds |
//! | 1 | bookmark count `m` (1–[`MAX_CLUSTERS`]) |
//! | 28 × m | per cluster: system identifier (8), timeline (4), LSN (8), replica tag (8, 0 for none) |
//! | 16 | MAC: HMAC-SHA256 over `len(name)` (4 bytes) `‖ name ‖` all bytes above, first 128 bits |
//!
//! The bytes are encoded as base64url without padding, so the token needs no
//! escaping in a cookie or a header. `name` is the cookie name: a token minted
//! for one cookie does not verify under another, and the length prefix keeps
//! every (name, bytes) pair apart. A one-cluster token is 84 characters
//! whatever the user id (an 8-byte id or a 64-byte e-mail address alike);
//! each further cluster adds 37 or 38.
//!
//! # What a token reveals
//!
//! A token is signed, not encrypted. Anyone who sees the cookie or the
//! `x-primary-affinity` header (same-origin JavaScript can read the header)
//! can read: the key id, the expiry, and per cluster the system identifier,
//! timeline, WAL position and replica tag (a hash of the replica's address
//! and start time). **Not the user id**: only a tag keyed by the signing
//! key, which tells nothing about the id to whoever lacks the key, however
//! few ids there are, and differs under every key. A routing hint holds no
//! personal data.
//!
//! # Earlier versions
//!
//! Version 2 (the user id in clear, up to 255 bytes, MAC over `name ‖ 0x00 ‖
//! bytes`) and version 1 (one cluster) are still read, so tokens issued
//! before an upgrade keep their promise for their remaining life; every
//! token issued is version 3. Anything longer than [`MAX_ENCODED_LEN`]
//! (a version 2 token with a 255-byte user id and four clusters) is
//! rejected before it is decoded, and parsing never panics.
//!
//! # Later versions
//!
//! A rolling upgrade to a release that writes a new format has, for a
//! while, instances of this release meeting tokens they cannot read, each
//! of which may promise a write. So every version from 3 on keeps what
//! this release needs to tell that a token is the requester's and
//! unexpired: the same encoding (base64url without padding, at most
//! [`MAX_ENCODED_LEN`] characters) and the same first 18 bytes meaning the
//! same thing: version, key id, user tag (keyed as above) and expiry. The
//! rest, the bookmarks and the MAC (at least 16 bytes), are the version's
//! own. A token of a version above [`TOKEN_VERSION`] is read that far:
//! past its expiry it is refused as [`Expired`](TokenError::Expired), under
//! a known key with another user's tag it is another user's, and otherwise
//! it may be the requester's. The layer then sends every cluster's session
//! reads to the primary (counted as
//! [`RouteReason::UnknownVersion`](crate::RouteReason::UnknownVersion)) and
//! pins them in any token the response issues, until a write's capture
//! replaces the pin: unknown means unsafe. Its expiry is unchecked, so one
//! claiming more than [`MAX_TTL`](crate::middleware::MAX_TTL) and a day
//! ahead is junk that happened to parse (as for a token under an unknown
//! key). [`AffinityToken::verify`] refuses it as
//! [`WrongVersion`](TokenError::WrongVersion). Upgrade across a format
//! change in any order; the instances still on the older release cost
//! primary reads for one TTL, never a stale one in this layer's clusters.
//! Other services' bookmarks in such a token cannot be read: a write
//! through an older instance replaces the every-cluster claim with what it
//! captured, so in setups where services pass tokens on, upgrade the
//! services that read other services' bookmarks first (see [what an issued
//! token keeps](crate::middleware#what-an-issued-token-keeps)).
//!
//! # Checks, cheapest first
//!
//! Verification is two steps. The first needs no MAC and allocates nothing:
//! length, base64url, layout, version and expiry, then a key id the
//! [`KeySet`] holds and the requester's tag under that key (a SipHash, tens
//! of nanoseconds). Only a token that passes all of them costs an HMAC, the
//! second step: one per key with the token's one-byte id. The layer bounds
//! that second step per request (see
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
//! use read_after_write::{AffinityToken, KeySet, Lsn, SigningKey, TokenError, UserId, WritePosition};
//!
//! let keys = KeySet::new(SigningKey::from_bytes(&[7; 32])?);
//! let position = WritePosition::new(Lsn::new(0x16B_3748), 1, 7_301_234_567_890_123_456);
//! let alice = UserId::try_from("alice@example.com")?;
//! let token = AffinityToken::new(alice.clone(), position, 1_700_000_030);
//!
//! let text = token.sign("primary_affinity", &keys);
//! assert_eq!(text.len(), 84);
//! let back = AffinityToken::verify(&text, "primary_affinity", &keys, 1_700_000_000, &alice)?;
//! assert_eq!(back.position(), position);
//!
//! // Not the address in any form, and not for anyone else.
//! assert!(!text.contains("YWxpY2") && !text.contains("alice"));
//! let bob = UserId::try_from("bob@example.com")?;
//! assert_eq!(
//!     AffinityToken::verify(&text, "primary_affinity", &keys, 1_700_000_000, &bob),
//!     Err(TokenError::OtherUser)
//! );
//! // Past its expiry, or under another name, it is refused.
//! assert!(AffinityToken::verify(&text, "primary_affinity", &keys, 1_700_000_031, &alice).is_err());
//! assert!(AffinityToken::verify(&text, "other", &keys, 1_700_000_000, &alice).is_err());
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

mod keys;
mod user;
mod wire;

pub use keys::{KeyError, KeySet, SigningKey};
pub use user::{UserId, UserIdTooLong};
#[cfg(test)]
pub(crate) use wire::macs_computed;
pub(crate) use wire::{Checked, MacBudget, TokenBuffer, UnverifiedToken};

use crate::bookmark::{Bookmark, Bookmarks, MAX_CLUSTERS};
use crate::position::WritePosition;

/// The token format version this crate writes. It reads this one and
/// versions 1 and 2.
pub const TOKEN_VERSION: u8 = 3;

/// The longest encoded token accepted, in characters: a version 2
/// token with a 255-byte user id and [`MAX_CLUSTERS`] bookmarks. Longer
/// input is rejected as [`TokenError::TooLong`] before any decoding.
///
/// ```
/// assert_eq!(read_after_write::token::MAX_ENCODED_LEN, 527);
/// ```
pub const MAX_ENCODED_LEN: usize = (wire::MAX_RAW_LEN * 4).div_ceil(3);

/// Why a token was refused. Each is a reason to treat the token as absent,
/// but two: a token under a key id this instance does not know
/// ([`UnknownKey`](Self::UnknownKey)) or in a later release's format
/// ([`WrongVersion`](Self::WrongVersion)) that names the requester and has
/// not expired may promise a write, so the layer reads from the primary
/// instead.
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
    /// The token has a format version this crate does not read. The
    /// layer treats one of a later version that names the requester and
    /// has not expired like [`UnknownKey`](Self::UnknownKey): it may
    /// promise a write, so the primary (see
    /// [later versions](crate::token#later-versions)).
    #[error(
        "affinity token has a format version this server does not read (a release with a newer \
         token format rolling out?)"
    )]
    WrongVersion,
    /// The token is longer than [`MAX_ENCODED_LEN`].
    #[error("affinity token is longer than any valid token")]
    TooLong,
    /// The token is genuine for someone, but not for the user it was
    /// checked for (verification with [`AffinityToken::verify`] only).
    #[error("affinity token belongs to another user")]
    OtherUser,
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
            TokenError::OtherUser => "other_user",
        }
    }
}

/// A decoded affinity token: whom it belongs to, what the session's reads
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
    /// let back = AffinityToken::verify(&token.sign("a", &keys), "a", &keys, 0, &UserId::from(1u64))?;
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

    /// The user the token belongs to: the one it was built for, or, for a
    /// verified token, the one it was verified for.
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
    /// cookie name) and to its user, and returns it as base64url without
    /// padding. Always in the current format, [`TOKEN_VERSION`]: the user id
    /// is not in it, only a tag keyed by the signing key.
    pub fn sign(&self, name: &str, keys: &KeySet) -> String {
        wire::encode(self, keys.current(), name)
    }

    /// Checks a token's length, encoding, layout, version, expiry against
    /// `now_unix`, key id and user (the token must be `user`'s), then its
    /// MAC (in constant time, under each key with the token's id), in that
    /// order, and decodes it. Reads versions 1, 2 and 3.
    ///
    /// Never panics, whatever `text` holds. A forged token that also fails
    /// an earlier check is refused for that earlier reason: only a token that
    /// would otherwise be accepted costs an HMAC. An expired token is
    /// [`Expired`](TokenError::Expired) whichever key signed it; a token of
    /// another user is [`OtherUser`](TokenError::OtherUser) and costs no
    /// MAC (its tag, keyed, is checked first).
    ///
    /// ```
    /// use read_after_write::{AffinityToken, KeySet, SigningKey, TokenError, UserId};
    ///
    /// let keys = KeySet::new(SigningKey::from_bytes(&[7; 32])?);
    /// let err = AffinityToken::verify("not a token", "primary_affinity", &keys, 0, &UserId::from(1u64));
    /// assert_eq!(err, Err(TokenError::Malformed));
    /// # Ok::<_, read_after_write::KeyError>(())
    /// ```
    pub fn verify(
        text: &str,
        name: &str,
        keys: &KeySet,
        now_unix: u64,
        user: &UserId,
    ) -> Result<Self, TokenError> {
        let mut buffer = TokenBuffer::new();
        let token = UnverifiedToken::parse(text, now_unix, &mut buffer)?;
        if token.is_newer() {
            return Err(TokenError::WrongVersion);
        }
        if !keys.knows(token.key_id()) {
            return Err(TokenError::UnknownKey);
        }
        let naming = token.naming(user, keys);
        if !naming.may_be_theirs() {
            return Err(TokenError::OtherUser);
        }
        // One caller, one token: no budget but the key list's.
        match token.authenticate_as(name, &naming, &mut MacBudget::new(usize::MAX)) {
            Checked::Authentic(token) => Ok(token),
            Checked::Forged | Checked::Unchecked => Err(TokenError::BadSignature),
        }
    }

    /// Decodes and authenticates a token whoever it names (the user is then
    /// the anonymous id): for tests that look at issued tokens' bookmarks.
    #[cfg(test)]
    pub(crate) fn decode_for_tests(
        text: &str,
        name: &str,
        keys: &KeySet,
        now_unix: u64,
    ) -> Result<Self, TokenError> {
        let mut buffer = TokenBuffer::new();
        let token = UnverifiedToken::parse(text, now_unix, &mut buffer)?;
        token
            .authenticate_whoever(name, keys)
            .ok_or(TokenError::BadSignature)
    }

    /// Signs as version 2 did, for tests of tokens issued before version 3.
    #[cfg(test)]
    pub(crate) fn sign_v2_for_tests(&self, name: &str, keys: &KeySet) -> String {
        wire::encode_v2(self, keys.current(), name)
    }

    /// A token decoded from `version`'s bytes.
    pub(crate) fn decoded(
        version: u8,
        key_id: u8,
        user: UserId,
        bookmarks: Bookmarks,
        expires_at: u64,
    ) -> Self {
        AffinityToken {
            version,
            key_id,
            user,
            bookmarks,
            expires_at,
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

#[cfg(test)]
mod tests;
