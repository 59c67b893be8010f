//! The token's bytes: layouts of every version read, encoding of the one
//! written, the cheap checks, and the MAC.

use base64_simd::{Out, URL_SAFE_NO_PAD};
use hmac::Mac;
use smallvec::SmallVec;

use super::keys::{KeyedMac, SigningKey};
use super::{AffinityToken, KeySet, TokenError, UserId, TOKEN_VERSION};
use crate::bookmark::{Bookmark, Bookmarks, ReplicaTag, MAX_CLUSTERS};
use crate::position::{Lsn, WritePosition};

/// Bytes of HMAC-SHA256 output kept in a token (128 bits).
pub(super) const TAG_LEN: usize = 16;
/// Versions 1 and 2: version, key id, user id length.
const LEGACY_HEAD_LEN: usize = 3;
/// Version 1, after the user id: LSN, timeline, system identifier, expiry.
const V1_FIXED_LEN: usize = 8 + 4 + 8 + 8;
/// Version 2, after the user id: expiry, bookmark count.
const V2_FIXED_LEN: usize = 8 + 1;
/// Version 3: version, key id, user tag, expiry, bookmark count.
const V3_HEAD_LEN: usize = 1 + 1 + 8 + 8 + 1;
/// Per bookmark (versions 2 and 3): system identifier, timeline, LSN,
/// replica tag.
const BOOKMARK_LEN: usize = 8 + 4 + 8 + 8;
/// The longest raw token read: version 2 with a 255-byte user id and
/// [`MAX_CLUSTERS`] bookmarks.
pub(super) const MAX_RAW_LEN: usize =
    LEGACY_HEAD_LEN + UserId::MAX_LEN + V2_FIXED_LEN + MAX_CLUSTERS * BOOKMARK_LEN + TAG_LEN;
/// The shortest raw token of versions 1 to 3: version 1 with an empty
/// user id.
const MIN_RAW_LEN: usize = LEGACY_HEAD_LEN + V1_FIXED_LEN + TAG_LEN;
/// The head every version from 3 on begins with: version, key id, user
/// tag, expiry.
pub(crate) const SHARED_HEAD_LEN: usize = 1 + 1 + 8 + 8;
/// The shortest raw token of a later version: the shared head and a MAC.
const MIN_LATER_LEN: usize = SHARED_HEAD_LEN + TAG_LEN;

/// The MAC of version 3 and on: HMAC-SHA256 over a length-prefixed `name`
/// then the token's bytes, so that no two (name, payload) pairs give the
/// same input. (Versions 1 and 2 used `name ‖ 0x00 ‖ payload`, which a name
/// holding a NUL byte could make ambiguous.)
fn mac_v3(key: &SigningKey, name: &str, payload: &[u8]) -> KeyedMac {
    let mut mac = key.mac();
    // A name longer than 4 GiB cannot be a cookie name; saturating keeps
    // the prefix fixed-width whatever a caller passes.
    let len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    mac.update(&len.to_be_bytes());
    mac.update(name.as_bytes());
    mac.update(payload);
    mac
}

/// The MAC of versions 1 and 2, still read for one token lifetime after an
/// upgrade.
fn mac_legacy(key: &SigningKey, name: &str, payload: &[u8]) -> KeyedMac {
    let mut mac = key.mac();
    mac.update(name.as_bytes());
    mac.update(&[0]);
    mac.update(payload);
    mac
}

/// Encodes `token` in the current format, signed with `key` for `name`.
pub(super) fn encode(token: &AffinityToken, key: &SigningKey, name: &str) -> String {
    let mut raw: SmallVec<[u8; 160]> = SmallVec::new();
    raw.push(TOKEN_VERSION);
    raw.push(key.id());
    raw.extend_from_slice(&key.user_tag(token.user().as_bytes()).to_be_bytes());
    raw.extend_from_slice(&token.expires_at().to_be_bytes());
    // Constructors keep 1..=MAX_CLUSTERS bookmarks.
    raw.push(token.bookmarks().len() as u8);
    for bookmark in token.bookmarks().as_slice() {
        raw.extend_from_slice(&bookmark.position.system_id.to_be_bytes());
        raw.extend_from_slice(&bookmark.position.timeline.to_be_bytes());
        raw.extend_from_slice(&bookmark.position.lsn.as_u64().to_be_bytes());
        raw.extend_from_slice(&ReplicaTag::to_wire(bookmark.replica, bookmark.floor).to_be_bytes());
    }
    let tag = mac_v3(key, name, &raw).finalize().into_bytes();
    raw.extend_from_slice(&tag[..TAG_LEN]);
    URL_SAFE_NO_PAD.encode_to_string(&raw)
}

/// Encodes `token` as version 2 did (the user id in clear, the old MAC
/// input), for tests of what tokens issued before version 3 do.
#[cfg(test)]
pub(super) fn encode_v2(token: &AffinityToken, key: &SigningKey, name: &str) -> String {
    let id = token.user().as_bytes();
    let mut raw: SmallVec<[u8; 400]> = SmallVec::new();
    raw.extend_from_slice(&[2, key.id(), id.len() as u8]);
    raw.extend_from_slice(id);
    raw.extend_from_slice(&token.expires_at().to_be_bytes());
    raw.push(token.bookmarks().len() as u8);
    for bookmark in token.bookmarks().as_slice() {
        raw.extend_from_slice(&bookmark.position.system_id.to_be_bytes());
        raw.extend_from_slice(&bookmark.position.timeline.to_be_bytes());
        raw.extend_from_slice(&bookmark.position.lsn.as_u64().to_be_bytes());
        raw.extend_from_slice(&bookmark.replica.map_or(0, ReplicaTag::get).to_be_bytes());
    }
    let tag = mac_legacy(key, name, &raw).finalize().into_bytes();
    raw.extend_from_slice(&tag[..TAG_LEN]);
    URL_SAFE_NO_PAD.encode_to_string(&raw)
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
    /// Every key with the token's id that could have signed it for the
    /// requester was tried; none matched.
    Forged,
    /// The budget ran out before every such key was tried: the token may
    /// be genuine.
    Unchecked,
}

/// Under which keys a token is a requester's
/// ([`UnverifiedToken::naming`]): it carries the requester, so that a token
/// authenticated under it is theirs and no one else's.
pub(crate) struct Naming<'a> {
    user: &'a UserId,
    /// The keys with the token's id under which it names `user` (none: it
    /// is another user's); `None` when the id is not in the key set, so
    /// that it may be theirs (a version 3 token's tag cannot be checked
    /// without its key).
    keys: Option<SmallVec<[&'a SigningKey; 2]>>,
}

impl Naming<'_> {
    /// Whether the token may be the requester's.
    pub(crate) fn may_be_theirs(&self) -> bool {
        self.keys.as_ref().is_none_or(|keys| !keys.is_empty())
    }

    /// The keys worth a MAC: none for an unknown key id.
    fn keys(&self) -> &[&SigningKey] {
        self.keys.as_deref().unwrap_or_default()
    }
}

/// How a token names its user.
enum Binding<'a> {
    /// Versions 1 and 2: the id itself, in clear.
    Id(&'a [u8]),
    /// Version 3: a keyed tag of the id ([`SigningKey::user_tag`]).
    Tag(u64),
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
    /// (which is at most [`MAX_ENCODED_LEN`](super::MAX_ENCODED_LEN) by the
    /// first check), allocation free, and never panics.
    pub(crate) fn parse(
        text: &str,
        now_unix: u64,
        buffer: &'a mut TokenBuffer,
    ) -> Result<Self, TokenError> {
        if text.len() > super::MAX_ENCODED_LEN {
            return Err(TokenError::TooLong);
        }
        // Canonical base64url only: no padding, whitespace or stray
        // trailing bits, so one token has one spelling.
        let len = URL_SAFE_NO_PAD
            .decoded_length(text.as_bytes())
            .map_err(|_| TokenError::Malformed)?;
        // The length check above keeps `len` within the buffer; `get_mut`
        // keeps that from being a panic should the two ever disagree.
        let out = buffer.0.get_mut(..len).ok_or(TokenError::Malformed)?;
        let raw: &[u8] = URL_SAFE_NO_PAD
            .decode(text.as_bytes(), Out::from_slice(out))
            .map_err(|_| TokenError::Malformed)?;
        let newer = raw.first().is_some_and(|&version| version > TOKEN_VERSION);
        if len < if newer { MIN_LATER_LEN } else { MIN_RAW_LEN } {
            return Err(TokenError::Malformed);
        }
        let count = |at: usize| -> Result<usize, TokenError> {
            // The count byte may sit past a short token's end.
            let count = usize::from(*raw.get(at).ok_or(TokenError::Malformed)?);
            if count == 0 || count > MAX_CLUSTERS {
                return Err(TokenError::Malformed);
            }
            Ok(count)
        };
        let legacy_body = LEGACY_HEAD_LEN + usize::from(raw[2]);
        let expected = match raw[0] {
            1 => legacy_body + V1_FIXED_LEN + TAG_LEN,
            2 => legacy_body + V2_FIXED_LEN + count(legacy_body + 8)? * BOOKMARK_LEN + TAG_LEN,
            3 => V3_HEAD_LEN + count(V3_HEAD_LEN - 1)? * BOOKMARK_LEN + TAG_LEN,
            // A later release's format: of its layout only the head every
            // version from 3 on begins with is known (see
            // `crate::token#later-versions`).
            version if version > TOKEN_VERSION => len,
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

    /// Whether the token is in a format of a later release than this one:
    /// its head (key id, user tag, expiry) is read, its bookmarks and MAC
    /// are not. It may promise a write in any cluster, so it claims every
    /// cluster ([`bookmarks`](Self::bookmarks)) and is never authentic.
    pub(crate) fn is_newer(&self) -> bool {
        self.version() > TOKEN_VERSION
    }

    /// The id of the key the token claims to be signed with.
    pub(crate) fn key_id(&self) -> u8 {
        self.raw[1]
    }

    /// Versions 1 and 2: where the fields after the user id start.
    fn legacy_body(&self) -> usize {
        LEGACY_HEAD_LEN + usize::from(self.raw[2])
    }

    fn binding(&self) -> Binding<'_> {
        match self.version() {
            1 | 2 => Binding::Id(&self.raw[LEGACY_HEAD_LEN..self.legacy_body()]),
            _ => Binding::Tag(u64::from_be_bytes(array(&self.raw[2..10]))),
        }
    }

    /// Whether the token, signed with `key`, would be `user`'s.
    fn names_under(&self, user: &UserId, key: &SigningKey) -> bool {
        match self.binding() {
            Binding::Id(id) => id == user.as_bytes(),
            Binding::Tag(tag) => key.user_tag(user.as_bytes()) == tag,
        }
    }

    /// Under which keys of `keys` the token is `user`'s, worked out once
    /// per token: each key costs a version 3 token a SipHash, and the keys
    /// that name the requester are the only ones worth a MAC.
    pub(crate) fn naming<'n>(&self, user: &'n UserId, keys: &'n KeySet) -> Naming<'n> {
        if !keys.knows(self.key_id()) {
            // A version 3 token under a key id the set does not hold cannot
            // be told apart from the requester's (its tag is keyed), so it
            // may be theirs: unknown means unsafe.
            let theirs = match self.binding() {
                Binding::Id(id) => id == user.as_bytes(),
                Binding::Tag(_) => true,
            };
            return Naming {
                user,
                keys: (!theirs).then(SmallVec::new),
            };
        }
        Naming {
            user,
            keys: Some(
                keys.with_id(self.key_id())
                    .filter(|key| self.names_under(user, key))
                    .collect(),
            ),
        }
    }

    /// Whether the token may be `user`'s: it names them under some key of
    /// `keys` with its id, or its key id is one the set does not hold.
    #[cfg(test)]
    pub(crate) fn may_name(&self, user: &UserId, keys: &KeySet) -> bool {
        self.naming(user, keys).may_be_theirs()
    }

    /// The bookmarks the token claims.
    pub(crate) fn bookmarks(&self) -> Bookmarks {
        let entries = match self.version() {
            version if version > TOKEN_VERSION => return Bookmarks::one(Bookmark::EVERY_CLUSTER),
            1 => {
                let at = self.legacy_body();
                let fixed = &self.raw[at..at + V1_FIXED_LEN];
                return Bookmarks::one(Bookmark::new(WritePosition::new(
                    Lsn::new(u64::from_be_bytes(array(&fixed[0..8]))),
                    u32::from_be_bytes(array(&fixed[8..12])),
                    u64::from_be_bytes(array(&fixed[12..20])),
                )));
            }
            2 => &self.raw[self.legacy_body() + V2_FIXED_LEN..self.raw.len() - TAG_LEN],
            _ => &self.raw[V3_HEAD_LEN..self.raw.len() - TAG_LEN],
        };
        let mut bookmarks = Bookmarks::new();
        for entry in entries.chunks_exact(BOOKMARK_LEN) {
            let (replica, floor) = ReplicaTag::from_wire(u64::from_be_bytes(array(&entry[20..28])));
            let bookmark = Bookmark {
                position: WritePosition::new(
                    Lsn::new(u64::from_be_bytes(array(&entry[12..20]))),
                    u32::from_be_bytes(array(&entry[8..12])),
                    u64::from_be_bytes(array(&entry[0..8])),
                ),
                replica,
                floor,
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
            1 => self.legacy_body() + 20,
            2 => self.legacy_body(),
            _ => 10,
        };
        u64::from_be_bytes(array(&self.raw[at..at + 8]))
    }

    /// Whether, if authentic, this token would add to what `known`
    /// already promises.
    pub(crate) fn adds_to(&self, known: &Bookmarks) -> bool {
        !known.covers(&self.bookmarks())
    }

    /// [`authenticate_as`](Self::authenticate_as) under the keys that name
    /// `user`, for tests.
    #[cfg(test)]
    pub(crate) fn authenticate(
        &self,
        name: &str,
        keys: &KeySet,
        user: &UserId,
        budget: &mut MacBudget,
    ) -> Checked {
        self.authenticate_as(name, &self.naming(user, keys), budget)
    }

    /// Checks the tag (HMAC-SHA256, compared in constant time) against each
    /// key [`naming`](Self::naming) found for `user`, one MAC
    /// of `budget` per key tried. Ids are one byte, so several keys may
    /// share one: counting keys, not tokens, keeps the budget a bound on
    /// work whatever the key list. A key under which the token is another
    /// user's costs nothing: it could only ever be that other user's token.
    pub(crate) fn authenticate_as(
        &self,
        name: &str,
        naming: &Naming<'_>,
        budget: &mut MacBudget,
    ) -> Checked {
        if self.is_newer() {
            // Its MAC's input is a later release's: it cannot be checked here.
            return Checked::Unchecked;
        }
        let (payload, tag) = self.raw.split_at(self.raw.len() - TAG_LEN);
        for key in naming.keys() {
            if !budget.take() {
                return Checked::Unchecked;
            }
            #[cfg(test)]
            MACS.with(|macs| macs.set(macs.get() + 1));
            let mac = match self.version() {
                1 | 2 => mac_legacy(key, name, payload),
                _ => mac_v3(key, name, payload),
            };
            if mac.verify_truncated_left(tag).is_ok() {
                return Checked::Authentic(AffinityToken::decoded(
                    self.version(),
                    self.key_id(),
                    naming.user.clone(),
                    self.bookmarks(),
                    self.expires_at(),
                ));
            }
        }
        Checked::Forged
    }

    /// Checks the MAC whoever the token names, for tests that inspect
    /// issued tokens' bookmarks; the token's user is then unknown (the
    /// anonymous id stands in for it).
    #[cfg(test)]
    pub(crate) fn authenticate_whoever(&self, name: &str, keys: &KeySet) -> Option<AffinityToken> {
        if self.is_newer() {
            return None;
        }
        let (payload, tag) = self.raw.split_at(self.raw.len() - TAG_LEN);
        keys.with_id(self.key_id()).find_map(|key| {
            let mac = match self.version() {
                1 | 2 => mac_legacy(key, name, payload),
                _ => mac_v3(key, name, payload),
            };
            mac.verify_truncated_left(tag).is_ok().then(|| {
                AffinityToken::decoded(
                    self.version(),
                    self.key_id(),
                    UserId::anonymous(),
                    self.bookmarks(),
                    self.expires_at(),
                )
            })
        })
    }

    /// Signs a version 1 or 2 token's bytes as the releases before version
    /// 3 did, for tests of their reading.
    #[cfg(test)]
    pub(super) fn sign_legacy(raw: &mut SmallVec<[u8; 400]>, key: &SigningKey, name: &str) {
        let tag = mac_legacy(key, name, raw).finalize().into_bytes();
        raw.extend_from_slice(&tag[..TAG_LEN]);
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
