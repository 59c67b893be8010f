//! Token issuance: what the token a request issues carries (never less
//! than its tokens promised, read or not), the capture of the primary's
//! position after a write, and signing. Used by the response future and by
//! the handle's hand-offs (`forward_header`, `requirement`).

use smallvec::SmallVec;

use crate::backend::Backend;
use crate::bookmark::{Bookmark, Bookmarks};
use crate::config::Shared;
use crate::position::WritePosition;
use crate::request::{RequestState, Unread};
use crate::token::{AffinityToken, UserId};

/// The positions captured after the handler, one per cluster of the layer
/// (`None` where the request neither wrote nor, with monotonic reads, read
/// the primary).
pub(crate) type Captured = SmallVec<[Option<WritePosition>; 1]>;

/// Whether any cluster's position must be captured for this response.
pub(crate) fn needs_capture<B>(shared: &Shared<B>, state: &RequestState) -> bool {
    state
        .clusters
        .iter()
        .any(|c| c.wrote() || (shared.monotonic() && c.read_primary()))
}

/// With monotonic reads, a session that keeps reading keeps its bookmark
/// alive: its token is re-issued once less than half its TTL is left.
pub(crate) fn refresh_due<B>(shared: &Shared<B>, state: &RequestState) -> bool {
    let half = crate::config::ttl_seconds(shared).unsigned_abs() / 2;
    !state.carried.is_empty()
        && shared.clock.now_unix().saturating_add(half) >= state.carried_expiry
}

/// Captures the primary's position of every cluster that needs it.
pub(crate) async fn capture_all<B: Backend>(shared: &Shared<B>, state: &RequestState) -> Captured {
    let mut captured = Captured::new();
    for (cluster, own) in shared.clusters.iter().zip(&state.clusters) {
        let capture = own.wrote() || (shared.monotonic() && own.read_primary());
        captured.push(if capture {
            Some(capture_position(&*cluster.backend, cluster.id).await)
        } else {
            None
        });
    }
    captured
}

/// The position `backend`'s primary reports now; on failure a position
/// that pins the cluster `id`'s session reads to the primary (see
/// [`WritePosition::pins_primary`]).
pub(crate) async fn capture_position<B: Backend>(backend: &B, id: Option<u64>) -> WritePosition {
    match backend.write_position().await {
        Ok(position) => position,
        Err(error) => {
            metrics::counter!("read_after_write_capture_failures_total").increment(1);
            tracing::warn!(
                %error,
                "could not capture the write position; the affinity token pins this user's \
                 session reads to the primary until their next write or its expiry"
            );
            Bookmark::pinned(id.unwrap_or(0)).position
        }
    }
}

/// The bookmarks a token issued now carries. Never less than the request's
/// tokens promised, read or not (see the
/// [middleware docs](crate::middleware#what-an-issued-token-keeps)):
///
/// - what the valid tokens carried, each cluster's bookmark moved on by
///   the position captured for it, or, with monotonic reads, by the replica
///   its reads used;
/// - a pin for each cluster that a token the request could not read names
///   and the request did not capture;
/// - the all-zero marker, which pins every cluster, kept until a capture
///   replaces it (with a pin for each of the layer's clusters not captured),
///   and issued whenever the pins do not all fit.
pub(crate) fn next_bookmarks<B>(
    shared: &Shared<B>,
    state: &RequestState,
    captured: &[Option<WritePosition>],
) -> Bookmarks {
    // What the request's tokens carried and claimed, unless the handler
    // bound the request to another named user: theirs are not this user's.
    let (no_carried, no_unread) = (Bookmarks::new(), Unread::default());
    let (carried, unread) = match state.inherits() {
        true => (&state.carried, &state.unread),
        false => (&no_carried, &no_unread),
    };
    let mut bookmarks = carried.clone();
    // A capture after the request covers every commit before it in its
    // cluster, whatever a token promised there: the unknown write behind a
    // pin or the marker included. A failed capture (a pin) covers nothing.
    let covered = |id: u64| {
        captured
            .iter()
            .flatten()
            .any(|at| !at.pins_primary() && at.system_id == id)
    };
    let any_covered = captured.iter().flatten().any(|at| !at.pins_primary());
    let carried_marker = bookmarks
        .as_slice()
        .iter()
        .any(Bookmark::pins_every_cluster);
    let marker = carried_marker || unread.claims_every_cluster();
    // Carried on by every later write, the marker would keep the user's
    // reads on the primary for good. The capture covers the clusters it
    // captured; the layer's others are pinned below.
    let replace_marker = marker && any_covered;
    if replace_marker {
        bookmarks.retain(|b| !b.pins_every_cluster());
    }
    let mut own = Bookmarks::new();
    let mut pins = Bookmarks::new();
    for (index, (cluster, state)) in shared.clusters.iter().zip(&state.clusters).enumerate() {
        let next = match captured.get(index).copied().flatten() {
            Some(written) => {
                // Keyed by the position's own cluster, so a backend that
                // cannot name its cluster leaves other services' bookmarks
                // alone. Never lower than what was carried for it, unless
                // the capture replaces an unknown position.
                let carried = bookmarks.get(written.system_id).map(|b| b.position);
                let position = match carried {
                    Some(carried) if !written.pins_primary() && !carried.pins_primary() => {
                        carried.max(written)
                    }
                    _ => written,
                };
                // A write is not a read: the session still saw no more than
                // its replica holds, so it may stay there (with the floor it
                // had seen, if any). A read of the primary is bounded only by
                // the capture: the session may come back to a replica it
                // left for lag once that replica has replayed it.
                let before = state.bookmark();
                let monotonic = shared.monotonic() && !position.pins_primary();
                Some(match (before.and_then(|b| b.replica), state.kept()) {
                    (Some(tag), _) if monotonic && !state.read_primary() => Bookmark {
                        floor: before.is_some_and(|b| b.floor),
                        ..Bookmark::new(position).on_replica(tag)
                    },
                    (_, Some(tag)) if monotonic && state.read_primary() => {
                        Bookmark::new(position).returning_to(tag)
                    }
                    _ => Bookmark::new(position),
                })
            }
            None if shared.monotonic() => state.earned(),
            None => None,
        };
        match (next, cluster.id) {
            (Some(next), _) => {
                own.set(next);
            }
            (None, Some(id)) if replace_marker && !covered(id) => {
                pins.set(Bookmark::pinned(id));
            }
            (None, _) => {}
        }
    }
    let mut fits = !unread.overflowed();
    for id in unread.clusters().filter(|id| !covered(*id)) {
        fits &= pins.set(Bookmark::pinned(id));
    }
    if marker && !replace_marker && !carried_marker {
        fits &= pins.set(Bookmark::EVERY_CLUSTER);
    }
    fits = fits && place(shared, &mut bookmarks, &own, &pins);
    if !fits {
        return every_cluster(shared, carried);
    }
    bookmarks
}

/// The token for pins that found no room: which clusters they name cannot
/// be written down, so the all-zero marker pins every cluster until the
/// user's next write replaces it. Other services' bookmarks stay beside it
/// where they fit, so that they outlive that replacement; this layer's own
/// clusters need none (that write captures or pins each of them).
fn every_cluster<B>(shared: &Shared<B>, carried: &Bookmarks) -> Bookmarks {
    let mut marked = Bookmarks::one(Bookmark::EVERY_CLUSTER);
    for bookmark in carried.as_slice() {
        let id = bookmark.system_id();
        if !shared.clusters.iter().any(|c| c.id == Some(id)) && !marked.set(*bookmark) {
            break;
        }
    }
    marked
}

/// Puts this request's own bookmarks, then its pins, into `bookmarks`, in
/// place where a cluster is there already. Room for an own bookmark is made
/// by dropping another service's (this layer's own come first, as
/// [`MAX_CLUSTERS`](crate::bookmark::MAX_CLUSTERS) documents); a pin never
/// pushes out a verified bookmark, since it may come from a planted token.
/// Returns false when something did not fit.
fn place<B>(
    shared: &Shared<B>,
    bookmarks: &mut Bookmarks,
    own: &Bookmarks,
    pins: &Bookmarks,
) -> bool {
    let needed = |id: u64| own.get(id).is_some() || pins.get(id).is_some();
    let layers = |id: u64| shared.clusters.iter().any(|c| c.id == Some(id));
    for next in own.as_slice() {
        if bookmarks.set(*next) {
            continue;
        }
        let Some(other) = bookmarks
            .as_slice()
            .iter()
            .rev()
            .map(Bookmark::system_id)
            .find(|id| !needed(*id) && !layers(*id))
        else {
            return false;
        };
        bookmarks.retain(|b| b.system_id() != other);
        bookmarks.set(*next);
    }
    for pin in pins.as_slice() {
        let merged = bookmarks
            .get(pin.system_id())
            .map_or(*pin, |carried| carried.merge(pin));
        if !bookmarks.set(merged) {
            return false;
        }
    }
    true
}

/// A signed token for `user` carrying `bookmarks`, valid for the layer's
/// TTL; `None` when there is no bookmark to carry.
pub(crate) fn mint_token<B>(
    shared: &Shared<B>,
    user: UserId,
    bookmarks: Bookmarks,
) -> Option<String> {
    // The clock has whole seconds and a token is valid while `now <
    // expires_at`: one more second makes it live at least the full TTL
    // whatever fraction of a second it was issued in (less the coarse
    // clock's tick, against a precise one: milliseconds).
    let ttl = crate::config::ttl_seconds(shared).unsigned_abs();
    let expires_at = shared
        .clock
        .now_unix()
        .saturating_add(ttl)
        .saturating_add(1);
    let token = AffinityToken::with_bookmarks(user, bookmarks, expires_at).ok()?;
    Some(token.sign(&shared.cookie_name, &shared.keys))
}
