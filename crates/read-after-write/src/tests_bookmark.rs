//! Unit tests of bookmarks: promise order, merging, the wire form of a
//! replica tag and its floor bit.

use proptest::prelude::*;

use super::*;

fn at(lsn: u64, timeline: u32, system: u64) -> Bookmark {
    Bookmark::new(WritePosition::new(Lsn::new(lsn), timeline, system))
}

fn tag(value: u64) -> ReplicaTag {
    ReplicaTag::new(value).unwrap()
}

/// A bookmark of cluster `system` from a small space (equal positions,
/// two replicas or none, pins), or now and then the all-zero one that
/// pins every cluster.
fn bookmark_of(system: u64) -> impl Strategy<Value = Bookmark> {
    let position = prop_oneof![
        1 => Just(WritePosition::default()),
        1 => Just(Bookmark::pinned(system).position),
        6 => (0u64..4, 1u32..3)
            .prop_map(move |(lsn, timeline)| WritePosition::new(Lsn::new(lsn), timeline, system)),
    ];
    (position, 0u64..3, any::<bool>()).prop_map(|(position, replica, floor)| {
        let replica = ReplicaTag::new(replica);
        Bookmark {
            position,
            replica,
            floor: floor && replica.is_some(),
        }
    })
}

/// Bookmarks of clusters 1 to 6 (so a merge may not fit), at most one
/// per cluster as [`Bookmarks::set`] keeps them.
fn bookmarks() -> impl Strategy<Value = Bookmarks> {
    proptest::collection::vec((1u64..7).prop_flat_map(bookmark_of), 0..5).prop_map(|all| {
        let mut bookmarks = Bookmarks::new();
        for bookmark in all {
            bookmarks.set(bookmark);
        }
        bookmarks
    })
}

fn at_least(ordering: Option<Ordering>) -> bool {
    matches!(ordering, Some(Ordering::Greater | Ordering::Equal))
}

/// `merged` promises everything `input` did: at least as much, or it
/// pins the primary.
fn covers(merged: &Bookmark, input: &Bookmark) -> bool {
    at_least(merged.cmp_promise(input)) || merged.position.pins_primary()
}

proptest! {
    #[test]
    fn merge_is_commutative_up_to_promise(a in bookmark_of(7), b in bookmark_of(7)) {
        let (ab, ba) = (a.merge(&b), b.merge(&a));
        prop_assert_eq!(ab.cmp_promise(&ba), Some(Ordering::Equal), "{:?} {:?}", ab, ba);
    }

    #[test]
    fn merge_is_associative_up_to_promise(
        a in bookmark_of(7),
        b in bookmark_of(7),
        c in bookmark_of(7),
    ) {
        let (left, right) = (a.merge(&b).merge(&c), a.merge(&b.merge(&c)));
        prop_assert_eq!(left.cmp_promise(&right), Some(Ordering::Equal), "{:?} {:?}", left, right);
    }

    #[test]
    fn merge_is_idempotent(a in bookmark_of(7)) {
        prop_assert_eq!(a.merge(&a), a);
    }

    #[test]
    fn merge_promises_at_least_each_input(a in bookmark_of(7), b in bookmark_of(7)) {
        let merged = a.merge(&b);
        prop_assert!(covers(&merged, &a), "{merged:?} drops {a:?}");
        prop_assert!(covers(&merged, &b), "{merged:?} drops {b:?}");
    }

    #[test]
    fn cmp_promise_is_antisymmetric(a in bookmark_of(7), b in bookmark_of(7)) {
        prop_assert_eq!(a.cmp_promise(&b), b.cmp_promise(&a).map(Ordering::reverse));
    }

    #[test]
    fn cmp_promise_is_transitive_where_defined(
        a in bookmark_of(7),
        b in bookmark_of(7),
        c in bookmark_of(7),
    ) {
        if at_least(a.cmp_promise(&b)) && at_least(b.cmp_promise(&c)) {
            prop_assert!(at_least(a.cmp_promise(&c)), "{a:?} >= {b:?} >= {c:?}");
        }
        if a.cmp_promise(&b) == Some(Ordering::Greater) && at_least(b.cmp_promise(&c)) {
            prop_assert_eq!(a.cmp_promise(&c), Some(Ordering::Greater));
        }
    }

    #[test]
    fn bookmarks_merge_never_drops_a_cluster_that_fits(
        mine in bookmarks(),
        theirs in bookmarks(),
    ) {
        let mut merged = mine.clone();
        let fits = merged.merge(&theirs);
        let clusters: std::collections::BTreeSet<u64> = mine
            .as_slice()
            .iter()
            .chain(theirs.as_slice())
            .map(Bookmark::system_id)
            .collect();
        prop_assert_eq!(fits, clusters.len() <= MAX_CLUSTERS);
        // What was there stays, promising at least what it did.
        for before in mine.as_slice() {
            let after = merged.get(before.system_id());
            prop_assert!(after.is_some_and(|after| covers(after, before)), "{before:?} dropped");
        }
        // What comes in is kept while there is room, and then nothing
        // else changes.
        for incoming in theirs.as_slice() {
            match merged.get(incoming.system_id()) {
                Some(after) => prop_assert!(covers(after, incoming), "{after:?} < {incoming:?}"),
                None => prop_assert!(!fits && merged.len() == MAX_CLUSTERS),
            }
        }
        prop_assert!(merged.len() <= MAX_CLUSTERS);
        prop_assert_eq!(merged.covers(&theirs), fits);
    }
}

#[test]
fn a_floor_and_a_higher_write_on_one_replica_merge_into_the_higher_floor() {
    let floor = at(5, 1, 7).returning_to(tag(1));
    let wrote = at(9, 1, 7).on_replica(tag(1));
    assert_eq!(floor.cmp_promise(&wrote), None);
    assert_eq!(floor.merge(&wrote), at(9, 1, 7).returning_to(tag(1)));
    assert_eq!(wrote.merge(&floor), at(9, 1, 7).returning_to(tag(1)));
    // The same position: the floor promises more.
    assert_eq!(
        at(5, 1, 7)
            .returning_to(tag(1))
            .cmp_promise(&at(5, 1, 7).on_replica(tag(1))),
        Some(Ordering::Greater)
    );
    // A floor on another replica: only the primary has both.
    assert!(floor
        .merge(&at(5, 1, 7).on_replica(tag(2)))
        .position
        .pins_primary());
}

proptest! {
    #[test]
    fn replica_tags_leave_the_floor_bit_free(name in "[a-z0-9#-]{0,12}", started in any::<i64>()) {
        let tag = ReplicaTag::of(&name, started);
        prop_assert_eq!(tag.get() >> 63, 0);
        prop_assert_eq!(ReplicaTag::new(tag.get()), Some(tag));
        for floor in [false, true] {
            prop_assert_eq!(ReplicaTag::from_wire(ReplicaTag::to_wire(Some(tag), floor)), (Some(tag), floor));
        }
    }
}

#[test]
fn merge_keeps_the_larger_promise_and_pins_on_two_replicas() {
    let low = at(0x100, 1, 7);
    let high = at(0x200, 1, 7);
    assert_eq!(low.merge(&high), high);
    assert_eq!(high.merge(&low), high);
    // One replica: the higher position.
    let on = |b: Bookmark| b.on_replica(tag(1));
    assert_eq!(on(low).merge(&on(high)), on(high));
    // Tied to a replica and to none, or to two replicas: what the
    // session saw has no common bound but the primary.
    assert_eq!(low.on_replica(tag(1)).merge(&high), Bookmark::pinned(7));
    let two = low.on_replica(tag(1)).merge(&low.on_replica(tag(2)));
    assert_eq!(two, Bookmark::pinned(7));
    // A pinned bookmark beats every position of its cluster.
    assert_eq!(Bookmark::pinned(7).merge(&high), Bookmark::pinned(7));
    assert_eq!(high.merge(&Bookmark::pinned(7)), Bookmark::pinned(7));
}

#[test]
fn bookmarks_merge_per_cluster_and_never_mix_clusters() {
    let mut mine = Bookmarks::one(at(0x100, 1, 7));
    let theirs = Bookmarks::one(at(0x900, 1, 8));
    assert!(mine.merge(&theirs));
    assert_eq!(mine.get(7), Some(&at(0x100, 1, 7)));
    assert_eq!(mine.get(8), Some(&at(0x900, 1, 8)));
    assert!(mine.covers(&theirs));
    assert!(!theirs.covers(&mine));
    let mut more = Bookmarks::one(at(0x200, 1, 7));
    more.merge(&mine);
    assert_eq!(more.get(7), Some(&at(0x200, 1, 7)));
}

#[test]
fn a_fifth_cluster_does_not_fit() {
    let mut bookmarks = Bookmarks::new();
    for system in 1..=4 {
        assert!(bookmarks.set(at(1, 1, system)));
    }
    assert!(!bookmarks.merge(&Bookmarks::one(at(1, 1, 5))));
    assert_eq!(bookmarks.len(), MAX_CLUSTERS);
    assert!(
        bookmarks.set(at(2, 1, 4)),
        "an existing cluster is replaced"
    );
}
