//! Bookmarks: a session's place in one cluster, as a token carries it.
//!
//! A [`Bookmark`] says what a session's reads of one cluster must include:
//! a [`WritePosition`] every read must have replayed (the user's last write,
//! or what the session is known to have seen), and, with monotonic reads, the
//! replica the session read last ([`ReplicaTag`]), where it may stay.
//!
//! # What "seen" means, and why the replica travels
//!
//! When a read goes to a replica, the tracker's last poll of that replica is
//! a *lower* bound of what the query saw: the replica may have replayed more
//! between the poll and the query. Using it as the session's floor would let
//! a later read move to a replica that sits between the two and see time go
//! backwards. The only upper bounds are a poll of the same replica made
//! after the query ended (not known when the response leaves), or the
//! primary's position captured after it.
//!
//! So a bookmark records the replica itself, and means: the session's reads
//! saw no more than that replica holds now. Replay on one server incarnation
//! never goes backwards, so staying on it is safe without knowing any upper
//! bound; the tag names the replica *and* its incarnation (it covers the
//! postmaster's start time), so a restarted replica, which may briefly serve
//! an older state, is not mistaken for the one the session read.
//!
//! - A read on the bookmark's replica keeps it. [`Db::read`](crate::Db::read)
//!   also needs the replica to hold `position` (the user's writes), and
//!   waits for it if it does not yet; [`Db::eventual`](crate::Db::eventual)
//!   takes it as it is.
//! - A write keeps the replica (a write is not a read: the session still saw
//!   no more than the replica holds) and raises `position`.
//! - When the session must leave its replica (down, restarted, diverged, or
//!   too far behind its own write), nothing bounds what it saw there: the
//!   read goes to the primary, and the response captures the primary's
//!   position. The bookmark is then tied to no replica: everything the
//!   session saw is at most `position`, so any replica that has replayed it
//!   is safe, and the next read ties the session to one (a new token).
//! - When it left only because its replica lagged, and no other replica is
//!   predicted to replay the position clearly sooner (replicas that lag
//!   alike), it keeps that replica instead, with the captured position as a
//!   [`floor`](Bookmark::floor) ([`Bookmark::returning_to`]): every read
//!   there, eventual ones included, waits for the replica to replay it, and
//!   the first read back re-issues nothing. Safe for the same reason: what
//!   the session saw is at most the floor until it reads the replica again,
//!   and from then on at most what the replica holds.
//!
//! # Example
//!
//! ```
//! use read_after_write::bookmark::{Bookmark, ReplicaTag};
//! use read_after_write::{Lsn, WritePosition};
//! use std::cmp::Ordering;
//!
//! let wrote = Bookmark::new(WritePosition::new(Lsn::new(0x500), 1, 7));
//! let read = wrote.on_replica(ReplicaTag::new(0xA1).unwrap());
//!
//! // One replica: the higher position promises more.
//! let later = Bookmark::new(WritePosition::new(Lsn::new(0x900), 1, 7))
//!     .on_replica(ReplicaTag::new(0xA1).unwrap());
//! assert_eq!(later.cmp_promise(&read), Some(Ordering::Greater));
//! // Two tokens read on different replicas: only the primary has both.
//! let other = wrote.on_replica(ReplicaTag::new(0xB2).unwrap());
//! assert_eq!(read.cmp_promise(&other), None);
//! assert!(read.merge(&other).position.pins_primary());
//! ```

use std::cmp::Ordering;
use std::fmt;
use std::num::NonZeroU64;

use smallvec::SmallVec;

use crate::position::{Lsn, WritePosition};

/// The most clusters one token covers. A layer over more clusters is
/// refused at configuration. Where the tokens a layer issues have no room
/// for all their bookmarks, the layer's own come first and other services'
/// verified bookmarks beyond this are dropped; bookmarks pinned for tokens
/// the layer could not read are never dropped: the token then pins every
/// cluster instead (see
/// [what an issued token keeps](crate::middleware#what-an-issued-token-keeps)).
///
/// It bounds the token: with a 255-byte user id and four clusters the cookie
/// value is at most [`MAX_ENCODED_LEN`](crate::token::MAX_ENCODED_LEN)
/// characters.
pub const MAX_CLUSTERS: usize = 4;

/// One replica incarnation: a replica's name and its server's start time,
/// mixed into 63 bits. Never zero (zero means "no replica" on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaTag(NonZeroU64);

/// The top bit of a replica tag's wire value: [`Bookmark::floor`].
const FLOOR_BIT: u64 = 1 << 63;

impl ReplicaTag {
    /// A tag from its wire value; `None` for zero, or a value with the top
    /// bit set (the token keeps that bit for [`Bookmark::floor`]).
    ///
    /// ```
    /// use read_after_write::bookmark::ReplicaTag;
    ///
    /// assert!(ReplicaTag::new(0).is_none());
    /// assert!(ReplicaTag::new(1 << 63).is_none());
    /// assert_eq!(ReplicaTag::new(9).unwrap().get(), 9);
    /// ```
    pub fn new(value: u64) -> Option<Self> {
        if value & FLOOR_BIT != 0 {
            return None;
        }
        NonZeroU64::new(value).map(ReplicaTag)
    }

    /// The tag of the replica called `name` whose server started at
    /// `started_micros` (Unix microseconds, `pg_postmaster_start_time()`).
    /// Instances that name their replicas alike compute the same tag.
    ///
    /// ```
    /// use read_after_write::bookmark::ReplicaTag;
    ///
    /// let tag = ReplicaTag::of("replica-1", 1_700_000_000_000_000);
    /// assert_eq!(tag, ReplicaTag::of("replica-1", 1_700_000_000_000_000));
    /// assert_ne!(tag, ReplicaTag::of("replica-1", 1_700_000_000_000_001));
    /// assert_ne!(tag, ReplicaTag::of("replica-2", 1_700_000_000_000_000));
    /// ```
    pub fn of(name: &str, started_micros: i64) -> Self {
        // FNV-1a over the name, then the start time: stable across builds
        // and platforms, which `std`'s hasher does not promise.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in name
            .as_bytes()
            .iter()
            .chain(&[0])
            .chain(&started_micros.to_be_bytes())
        {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
        }
        ReplicaTag(NonZeroU64::new(hash & !FLOOR_BIT).unwrap_or(NonZeroU64::MIN))
    }

    /// The tag and [`Bookmark::floor`] as a token carries them: the tag's
    /// 63 bits, and the floor in the top bit.
    pub(crate) fn to_wire(replica: Option<ReplicaTag>, floor: bool) -> u64 {
        replica.map_or(0, |tag| tag.get() | if floor { FLOOR_BIT } else { 0 })
    }

    /// The tag and the floor from a token's value: a floor without a
    /// replica means nothing more than the position, so it reads as none.
    pub(crate) fn from_wire(value: u64) -> (Option<ReplicaTag>, bool) {
        let replica = ReplicaTag::new(value & !FLOOR_BIT);
        (replica, replica.is_some() && value & FLOOR_BIT != 0)
    }

    /// The wire value.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for ReplicaTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A session's place in one cluster: reads must have replayed `position`,
/// and, when `replica` is set, the session may have seen more than
/// `position` on that replica (see the [module docs](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Bookmark {
    /// What every read of the session must include.
    pub position: WritePosition,
    /// The replica incarnation the session read last, if any.
    pub replica: Option<ReplicaTag>,
    /// With a replica: the session has *seen* `position` (it read the
    /// primary there), so every read on `replica`, eventual ones included,
    /// waits for `position`. Without it, `position` on a replica is a write
    /// the session has not read back, which only session reads need.
    pub floor: bool,
}

impl Bookmark {
    /// A bookmark requiring `position`, tied to no replica.
    pub const fn new(position: WritePosition) -> Self {
        Bookmark {
            position,
            replica: None,
            floor: false,
        }
    }

    /// A bookmark of the cluster `system_id` that sends the session's reads
    /// to the primary: what is known about it has no upper bound a replica
    /// is known to hold.
    ///
    /// ```
    /// use read_after_write::bookmark::Bookmark;
    ///
    /// assert!(Bookmark::pinned(7).position.pins_primary());
    /// assert_eq!(Bookmark::pinned(7).system_id(), 7);
    /// ```
    pub const fn pinned(system_id: u64) -> Self {
        Bookmark::new(WritePosition::new(Lsn::ZERO, 0, system_id))
    }

    /// The all-zero position's bookmark, which pins every cluster: version
    /// 1's pin, a time-window token, or a token that could not name every
    /// cluster it must pin (see [`WritePosition::pins_primary`]).
    pub(crate) const EVERY_CLUSTER: Bookmark = Bookmark::pinned(0);

    /// Whether this is [`EVERY_CLUSTER`](Self::EVERY_CLUSTER).
    pub(crate) fn pins_every_cluster(&self) -> bool {
        self.position == WritePosition::default()
    }

    /// The same position, read on `replica`.
    pub fn on_replica(self, replica: ReplicaTag) -> Self {
        Bookmark {
            replica: Some(replica),
            ..self
        }
    }

    /// The same position as a floor the session has seen, with `replica`
    /// to return to once it has replayed it: what a monotonic session
    /// keeps after reading the primary because its replica lagged. Any
    /// read on `replica`, eventual ones included, waits for the position
    /// there; no other replica may serve the session.
    ///
    /// ```
    /// use read_after_write::bookmark::{Bookmark, ReplicaTag};
    /// use read_after_write::{Lsn, WritePosition};
    ///
    /// let tag = ReplicaTag::new(0xA1).unwrap();
    /// let kept = Bookmark::new(WritePosition::new(Lsn::new(0x900), 1, 7)).returning_to(tag);
    /// assert!(kept.floor);
    /// assert_eq!(kept.replica, Some(tag));
    /// ```
    pub fn returning_to(self, replica: ReplicaTag) -> Self {
        Bookmark {
            replica: Some(replica),
            floor: true,
            ..self
        }
    }

    /// The cluster this bookmark belongs to.
    pub fn system_id(&self) -> u64 {
        self.position.system_id
    }

    /// How much this bookmark promises compared with `other`: by
    /// [`WritePosition::cmp_promise`] when both are tied to no replica; when
    /// both are tied to the same one, by position and [`floor`](Self::floor)
    /// together (a floor promises more than the same position without one;
    /// `None` when one is higher and the other has the floor); `None` when
    /// they are tied to different replicas, or belong to different clusters.
    /// A bookmark pinned to the primary promises more than any other of its
    /// cluster.
    pub fn cmp_promise(&self, other: &Bookmark) -> Option<Ordering> {
        let positions = self.position.cmp_promise(&other.position)?;
        match (self.position.pins_primary(), other.position.pins_primary()) {
            (false, false) if self.replica != other.replica => None,
            (false, false) => match (positions, self.floor.cmp(&other.floor)) {
                (Ordering::Equal, floors) => Some(floors),
                (by_position, Ordering::Equal) => Some(by_position),
                (by_position, floors) if by_position == floors => Some(by_position),
                _ => None,
            },
            _ => Some(positions),
        }
    }

    /// A bookmark promising everything both do, for one cluster: the one
    /// that promises more; for two tied to the same replica that neither
    /// covers (one higher, the other a floor), the higher position as a
    /// floor there; when they are tied to different replicas, one that pins
    /// the primary, the only node known to hold what the session saw on
    /// both.
    pub fn merge(&self, other: &Bookmark) -> Bookmark {
        match self.cmp_promise(other) {
            Some(Ordering::Greater | Ordering::Equal) => *self,
            Some(Ordering::Less) => *other,
            None if self.replica.is_some()
                && self.replica == other.replica
                && self.position.cmp_promise(&other.position).is_some() =>
            {
                Bookmark {
                    position: self.position.max(other.position),
                    replica: self.replica,
                    floor: true,
                }
            }
            None if self.system_id() == other.system_id() => Bookmark::pinned(self.system_id()),
            // Callers merge bookmarks of one cluster only.
            None => *self,
        }
    }
}

/// Bookmarks of up to [`MAX_CLUSTERS`] clusters, at most one per cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bookmarks(SmallVec<[Bookmark; 1]>);

impl Bookmarks {
    /// No bookmark at all.
    pub fn new() -> Self {
        Bookmarks(SmallVec::new())
    }

    /// One bookmark.
    pub fn one(bookmark: Bookmark) -> Self {
        let mut bookmarks = Bookmarks::new();
        bookmarks.0.push(bookmark);
        bookmarks
    }

    /// The bookmarks, in the order they were added.
    pub fn as_slice(&self) -> &[Bookmark] {
        &self.0
    }

    /// How many clusters are covered.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no cluster is covered.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bookmark of the cluster `system_id`.
    pub fn get(&self, system_id: u64) -> Option<&Bookmark> {
        self.0.iter().find(|b| b.system_id() == system_id)
    }

    /// Puts `bookmark` in place of its cluster's, or adds it. Returns false,
    /// changing nothing, when it would be a cluster beyond
    /// [`MAX_CLUSTERS`].
    ///
    /// ```
    /// use read_after_write::bookmark::{Bookmark, Bookmarks};
    /// use read_after_write::{Lsn, WritePosition};
    ///
    /// let mut bookmarks = Bookmarks::new();
    /// for cluster in 1..=5 {
    ///     let added = bookmarks.set(Bookmark::new(WritePosition::new(Lsn::new(1), 1, cluster)));
    ///     assert_eq!(added, cluster <= 4);
    /// }
    /// ```
    pub fn set(&mut self, bookmark: Bookmark) -> bool {
        if let Some(slot) = self
            .0
            .iter_mut()
            .find(|b| b.system_id() == bookmark.system_id())
        {
            *slot = bookmark;
            return true;
        }
        if self.0.len() == MAX_CLUSTERS {
            return false;
        }
        self.0.push(bookmark);
        true
    }

    /// Keeps only the bookmarks for which `keep` holds.
    pub fn retain(&mut self, keep: impl FnMut(&Bookmark) -> bool) {
        let mut keep = keep;
        self.0.retain(|b| keep(b));
    }

    /// Merges `other` in, cluster by cluster ([`Bookmark::merge`]). Returns
    /// false when a cluster of `other` found no room; the caller decides
    /// whether that is safe.
    pub fn merge(&mut self, other: &Bookmarks) -> bool {
        let mut fits = true;
        for bookmark in &other.0 {
            let merged = match self.get(bookmark.system_id()) {
                Some(mine) => mine.merge(bookmark),
                None => *bookmark,
            };
            fits &= self.set(merged);
        }
        fits
    }

    /// Whether every cluster's bookmark here promises at least what
    /// `other`'s does, so `other` adds nothing.
    pub fn covers(&self, other: &Bookmarks) -> bool {
        other.0.iter().all(|theirs| {
            self.get(theirs.system_id()).is_some_and(|mine| {
                matches!(
                    mine.cmp_promise(theirs),
                    Some(Ordering::Greater | Ordering::Equal)
                )
            })
        })
    }
}

#[cfg(test)]
#[path = "tests_bookmark.rs"]
mod tests;
