//! WAL positions: what a token promises and what a replica has replayed.
//!
//! # Example
//!
//! ```
//! use read_after_write::{Lsn, WritePosition};
//!
//! let lsn: Lsn = "0/16B3748".parse().unwrap();
//! assert_eq!(lsn.as_u64(), 0x16B_3748);
//! assert_eq!(lsn.to_string(), "0/16B3748");
//!
//! let written = WritePosition::new(lsn, 1, 7_300_000_000_000_000_000);
//! let later = WritePosition::new(Lsn::new(0x16C_0000), 1, written.system_id);
//! assert_eq!(written.max(later), later);
//! ```

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// The sizes that decide where WAL page headers sit: PostgreSQL's
/// `wal_block_size` and `wal_segment_size` settings.
///
/// ```
/// use read_after_write::WalGeometry;
///
/// let g = WalGeometry::default();
/// assert_eq!((g.block_size, g.segment_size), (8192, 16 << 20));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WalGeometry {
    /// Size of one WAL page in bytes (`SHOW wal_block_size`).
    pub block_size: u64,
    /// Size of one WAL segment file in bytes (`SHOW wal_segment_size`).
    pub segment_size: u64,
}

impl Default for WalGeometry {
    /// PostgreSQL's defaults: 8 KiB pages in 16 MiB segments.
    fn default() -> Self {
        WalGeometry {
            block_size: 8192,
            segment_size: 16 << 20,
        }
    }
}

/// A PostgreSQL log sequence number: a byte position in the write-ahead log.
///
/// Displayed and parsed in PostgreSQL's `X/Y` form (two hexadecimal halves of
/// the 64-bit value), the form `pg_lsn` values take as text.
///
/// ```
/// use read_after_write::Lsn;
///
/// let a = Lsn::new(0x1_0000_0028);
/// assert_eq!(a.to_string(), "1/28");
/// assert!(a > Lsn::ZERO);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

impl Lsn {
    /// The invalid position `0/0`; nothing has been written before it.
    pub const ZERO: Lsn = Lsn(0);

    /// Wraps a raw 64-bit position.
    pub const fn new(raw: u64) -> Self {
        Lsn(raw)
    }

    /// The raw 64-bit position.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Rounds a `pg_current_wal_insert_lsn()` result down to the page start when
    /// it points just past a page header.
    ///
    /// When the last WAL record ends exactly at a page end, the insert position
    /// already points past the header of the next page: 24 bytes into an
    /// ordinary page, 40 bytes into the first page of a segment. A replica's
    /// replay position stops at the record end, the page start, so
    /// `replay >= token` would stay false until unrelated WAL arrives.
    ///
    /// Rounding down is exact, never optimistic: no record can end inside a
    /// page header, and an ordinary page's header is 24 bytes, so a position
    /// 40 bytes into an ordinary page (a 16-byte continuation) is a real record
    /// end and is kept. That is why the segment size must be known.
    ///
    /// ```
    /// use read_after_write::{Lsn, WalGeometry};
    ///
    /// let g = WalGeometry::default();
    /// // 24 bytes into an ordinary page: the short page header.
    /// assert_eq!(Lsn::new(0x0300_2018).round_down_page_header(g), Lsn::new(0x0300_2000));
    /// // 40 bytes into a 16 MiB segment: the long page header.
    /// assert_eq!(Lsn::new(0x0300_0028).round_down_page_header(g), Lsn::new(0x0300_0000));
    /// // Anywhere else it is unchanged.
    /// assert_eq!(Lsn::new(0x0300_2028).round_down_page_header(g), Lsn::new(0x0300_2028));
    /// ```
    pub const fn round_down_page_header(self, geometry: WalGeometry) -> Lsn {
        const SHORT_HEADER: u64 = 24;
        const LONG_HEADER: u64 = 40;
        if geometry.block_size == 0 || geometry.segment_size == 0 {
            return self;
        }
        let page_offset = self.0 % geometry.block_size;
        let segment_offset = self.0 % geometry.segment_size;
        if segment_offset == LONG_HEADER
            || (segment_offset != page_offset && page_offset == SHORT_HEADER)
        {
            Lsn(self.0 - page_offset)
        } else {
            self
        }
    }
}

impl From<u64> for Lsn {
    fn from(raw: u64) -> Self {
        Lsn(raw)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> Self {
        lsn.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN in PostgreSQL's `X/Y` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PostgreSQL LSN (expected two hexadecimal halves like `0/16B3748`)")]
pub struct ParseLsnError;

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or(ParseLsnError)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(ParseLsnError);
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| ParseLsnError)?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| ParseLsnError)?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Where a write landed: an LSN on one timeline of one cluster.
///
/// LSNs keep rising across a promotion, so an LSN alone cannot tell whether a
/// write survived a failover. The timeline and the cluster's system
/// identifier travel with it so a backend can apply its rule for positions
/// from another timeline or another cluster.
///
/// ```
/// use read_after_write::{Lsn, WritePosition};
///
/// let p = WritePosition::new(Lsn::new(100), 1, 42);
/// assert!(p.same_history(&WritePosition::new(Lsn::new(5), 1, 42)));
/// assert!(!p.same_history(&WritePosition::new(Lsn::new(5), 2, 42)));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WritePosition {
    /// The position in the write-ahead log.
    pub lsn: Lsn,
    /// The timeline the position was taken on (1 until the first promotion).
    pub timeline: u32,
    /// The cluster's system identifier (`pg_control_system()`); 0 when the
    /// backend cannot tell.
    pub system_id: u64,
}

impl WritePosition {
    /// A position on `timeline` of the cluster `system_id`.
    pub const fn new(lsn: Lsn, timeline: u32, system_id: u64) -> Self {
        WritePosition {
            lsn,
            timeline,
            system_id,
        }
    }

    /// Whether both positions are on the same timeline of the same cluster,
    /// so their LSNs can be compared.
    pub fn same_history(&self, other: &WritePosition) -> bool {
        self.timeline == other.timeline && self.system_id == other.system_id
    }

    /// The position a new token must promise after a request that carried
    /// `self` wrote and the backend reported `newer`.
    ///
    /// Whichever [promises more](Self::cmp_promise): on one timeline the
    /// larger LSN, across timelines of one cluster the later timeline (so a
    /// late report from an old primary never lowers the promise). Across
    /// clusters `newer` wins: it is what the current primary reports.
    pub fn max(self, newer: WritePosition) -> WritePosition {
        match self.cmp_promise(&newer) {
            Some(Ordering::Greater) => self,
            // Equal, less, or another cluster's (the current one's wins).
            _ => newer,
        }
    }

    /// Whether this position pins session reads to the primary: LSN 0 on
    /// timeline 0, which no replica can have replayed. A token carries it
    /// when its user's reads must go to the primary: in time-window mode,
    /// when the position of a write could not be captured, or when a
    /// session with monotonic reads left the replica it read. With a
    /// system identifier it pins that cluster only; the all-zero position
    /// pins every cluster.
    ///
    /// ```
    /// use read_after_write::{Lsn, WritePosition};
    ///
    /// assert!(WritePosition::default().pins_primary());
    /// assert!(WritePosition::new(Lsn::ZERO, 0, 7).pins_primary());
    /// assert!(!WritePosition::new(Lsn::ZERO, 1, 0).pins_primary());
    /// ```
    pub fn pins_primary(&self) -> bool {
        self.lsn == Lsn::ZERO && self.timeline == 0
    }

    /// How much this position promises compared with `other`: `Greater`
    /// when a node that has `self` must be further along.
    ///
    /// - [Pinned to the primary](Self::pins_primary) beats any position of
    ///   its cluster (the all-zero position, of every cluster); two pinned
    ///   positions are equal.
    /// - One cluster, one timeline: the higher LSN.
    /// - One cluster, different timelines: the higher timeline, which is
    ///   the cluster's later history whatever the LSNs say.
    /// - Different clusters (system identifiers): `None`, not comparable.
    ///
    /// ```
    /// use read_after_write::{Lsn, WritePosition};
    /// use std::cmp::Ordering;
    ///
    /// let p = WritePosition::new(Lsn::new(0x500), 1, 7);
    /// assert_eq!(p.cmp_promise(&WritePosition::new(Lsn::new(0x400), 1, 7)), Some(Ordering::Greater));
    /// assert_eq!(p.cmp_promise(&WritePosition::new(Lsn::new(0x400), 2, 7)), Some(Ordering::Less));
    /// assert_eq!(p.cmp_promise(&WritePosition::new(Lsn::new(0x400), 1, 8)), None);
    /// assert_eq!(p.cmp_promise(&WritePosition::default()), Some(Ordering::Less));
    /// ```
    pub fn cmp_promise(&self, other: &WritePosition) -> Option<Ordering> {
        let every_cluster = WritePosition::default();
        match (*self == every_cluster, *other == every_cluster) {
            (true, true) => return Some(Ordering::Equal),
            (true, false) => return Some(Ordering::Greater),
            (false, true) => return Some(Ordering::Less),
            (false, false) => {}
        }
        if self.system_id != other.system_id {
            return None;
        }
        match (self.pins_primary(), other.pins_primary()) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) if self.timeline != other.timeline => {
                Some(self.timeline.cmp(&other.timeline))
            }
            (false, false) => Some(self.lsn.cmp(&other.lsn)),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Positions from a small space, so that equal LSNs, timelines and
    /// clusters, pins and the all-zero position come up often.
    fn position() -> impl Strategy<Value = WritePosition> {
        let lsn = prop_oneof![0u64..4, Just(u64::MAX), any::<u64>()];
        prop_oneof![
            1 => Just(WritePosition::default()),
            1 => (0u64..3).prop_map(|system| WritePosition::new(Lsn::ZERO, 0, system)),
            8 => (lsn, 0u32..3, 0u64..3)
                .prop_map(|(lsn, timeline, system)| WritePosition::new(Lsn::new(lsn), timeline, system)),
        ]
    }

    fn at_least(ordering: Option<Ordering>) -> bool {
        matches!(ordering, Some(Ordering::Greater | Ordering::Equal))
    }

    proptest! {
        #[test]
        fn cmp_promise_is_antisymmetric(a in position(), b in position()) {
            prop_assert_eq!(a.cmp_promise(&b), b.cmp_promise(&a).map(Ordering::reverse));
            // Equal promises are equal positions: nothing else ties.
            prop_assert_eq!(a.cmp_promise(&b) == Some(Ordering::Equal), a == b);
        }

        #[test]
        fn cmp_promise_is_transitive_where_defined(
            a in position(),
            b in position(),
            c in position(),
        ) {
            if at_least(a.cmp_promise(&b)) && at_least(b.cmp_promise(&c)) {
                prop_assert!(at_least(a.cmp_promise(&c)), "{a:?} >= {b:?} >= {c:?}");
            }
            if a.cmp_promise(&b) == Some(Ordering::Greater) && at_least(b.cmp_promise(&c)) {
                prop_assert_eq!(a.cmp_promise(&c), Some(Ordering::Greater));
            }
        }

        #[test]
        fn max_never_promises_less_than_either_argument(old in position(), newer in position()) {
            let max = old.max(newer);
            prop_assert!(max == old || max == newer);
            // The reported position always counts...
            prop_assert!(at_least(max.cmp_promise(&newer)), "{max:?} < {newer:?}");
            // ...and, in the same history, so does the carried one; across
            // clusters the current primary's report wins.
            if old.cmp_promise(&newer).is_some() {
                prop_assert!(at_least(max.cmp_promise(&old)), "{max:?} < {old:?}");
                prop_assert_eq!(max, newer.max(old));
            }
        }
    }

    #[test]
    fn parses_and_prints_postgres_form() {
        for text in ["0/0", "0/16B3748", "1/28", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0x0/1",
            "1/2/3",
            "123456789/0",
            "g/0",
            "0-1",
        ] {
            assert_eq!(bad.parse::<Lsn>(), Err(ParseLsnError), "{bad:?}");
        }
    }

    #[test]
    fn page_boundary_positions_round_down_to_the_page_start() {
        let g = WalGeometry::default();
        // Short header: 24 bytes into any page that is not a segment start.
        assert_eq!(
            Lsn::new(8192 * 3 + 24).round_down_page_header(g),
            Lsn::new(8192 * 3)
        );
        // Long header: 40 bytes into the first page of a 16 MiB segment.
        let segment = 16 << 20;
        assert_eq!(
            Lsn::new(segment * 5 + 40).round_down_page_header(g),
            Lsn::new(segment * 5)
        );
        // 24 bytes into a segment start is inside the long header: a record
        // cannot end there, and the position is not an insert position either.
        assert_eq!(
            Lsn::new(segment * 5 + 24).round_down_page_header(g),
            Lsn::new(segment * 5 + 24)
        );
        // A record can end 40 bytes into an ordinary page (24-byte header plus
        // a 16-byte continuation); that is a real end position and stays, even
        // when the page sits on a 1 MiB boundary inside a 16 MiB segment.
        assert_eq!(
            Lsn::new(8192 * 3 + 40).round_down_page_header(g),
            Lsn::new(8192 * 3 + 40)
        );
        assert_eq!(
            Lsn::new((1 << 20) + 40).round_down_page_header(g),
            Lsn::new((1 << 20) + 40)
        );
        // Other geometries: 1 MiB segments make that same page a segment start.
        let small = WalGeometry {
            block_size: 8192,
            segment_size: 1 << 20,
        };
        assert_eq!(
            Lsn::new((1 << 20) + 40).round_down_page_header(small),
            Lsn::new(1 << 20)
        );
        let big_pages = WalGeometry {
            block_size: 32768,
            segment_size: 16 << 20,
        };
        assert_eq!(
            Lsn::new(32768 + 24).round_down_page_header(big_pages),
            Lsn::new(32768)
        );
        assert_eq!(
            Lsn::new(8192 + 24).round_down_page_header(big_pages),
            Lsn::new(8192 + 24)
        );
        // Positions inside a page are untouched.
        for offset in [0u64, 8, 23, 25, 48, 4096, 8184] {
            let lsn = Lsn::new(8192 * 7 + offset);
            assert_eq!(lsn.round_down_page_header(g), lsn, "offset {offset}");
        }
    }

    #[test]
    fn max_prefers_the_newer_history() {
        let old = WritePosition::new(Lsn::new(500), 1, 9);
        let same = WritePosition::new(Lsn::new(400), 1, 9);
        assert_eq!(old.max(same), old);
        let promoted = WritePosition::new(Lsn::new(400), 2, 9);
        assert_eq!(old.max(promoted), promoted);
        let other_cluster = WritePosition::new(Lsn::new(1), 1, 10);
        assert_eq!(old.max(other_cluster), other_cluster);
    }
}
