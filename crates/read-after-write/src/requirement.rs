//! [`Requirement`]: what reads acting for a user must see, in a form that
//! travels beyond the HTTP response: into a job's payload, a message, a log.
//!
//! A request's own session reads follow its token. Work done for the same
//! user elsewhere (a background job, a queue consumer) has no token; it
//! carries a `Requirement` instead, taken with
//! [`Db::requirement`](crate::Db::requirement) after the request's writes,
//! and reads with [`Requirement::route`]: a replica that has the position,
//! else a bounded wait, else the primary.
//!
//! # Example
//!
//! ```
//! use read_after_write::{Lsn, Requirement, WritePosition};
//!
//! let written = Requirement::Position(WritePosition::new(Lsn::new(0x16B_3748), 1, 7_301_234_567));
//! // Into the job's payload as text...
//! let text = written.to_string();
//! assert_eq!(text, "0/16B3748@1:7301234567");
//! // ...and back in the worker.
//! let back: Requirement = text.parse()?;
//! assert_eq!(back, written);
//! assert_eq!("primary".parse::<Requirement>()?, Requirement::Primary);
//! # Ok::<_, read_after_write::ParseRequirementError>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::backend::{Backend, RouteReason, Routed, Target};
use crate::position::{Lsn, WritePosition};

/// What reads acting for a user must see.
///
/// Text form (`Display` and `FromStr`, stable): `none`, `primary`, or
/// `<lsn>@<timeline>:<system identifier>`, e.g. `0/16B3748@1:7301234567`.
/// It is not signed: keep it where only your own code writes (a jobs table,
/// an internal queue), not in a client's hands; clients get the signed token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Requirement {
    /// Nothing to see: eventual reads are fine.
    #[default]
    Nothing,
    /// A node that has replayed this position on its timeline and cluster.
    Position(WritePosition),
    /// Only the primary is known to hold the user's last write (its
    /// position could not be captured, or the layer is in time-window mode).
    Primary,
}

impl Requirement {
    /// The requirement after a write that the backend reported at
    /// `written`, for a session that needed `self` before it. A `written`
    /// that [pins the primary](WritePosition::pins_primary) (a lost
    /// capture) gives [`Requirement::Primary`].
    ///
    /// ```
    /// use read_after_write::{Lsn, Requirement, WritePosition};
    ///
    /// let before = Requirement::Position(WritePosition::new(Lsn::new(900), 1, 7));
    /// let written = WritePosition::new(Lsn::new(500), 1, 7);
    /// // Positions never move backwards on one timeline.
    /// assert_eq!(before.after_write(written), before);
    /// assert_eq!(before.after_write(WritePosition::default()), Requirement::Primary);
    /// ```
    pub fn after_write(self, written: WritePosition) -> Requirement {
        if written.pins_primary() {
            return Requirement::Primary;
        }
        match self {
            Requirement::Position(carried) => Requirement::Position(carried.max(written)),
            Requirement::Nothing | Requirement::Primary => Requirement::Position(written),
        }
    }

    /// Where a read that must see this requirement goes: for a position,
    /// what [`Backend::session`] decides (a caught-up replica, a wait of at
    /// most `max_wait`, else the primary); for `Primary`, the primary; for
    /// `Nothing`, an eventual read.
    ///
    /// ```no_run
    /// # async fn worker(replicas: read_after_write::pg::PgReplicaSet, payload: &str)
    /// #     -> Result<(), Box<dyn std::error::Error>> {
    /// use read_after_write::Requirement;
    /// use std::time::Duration;
    ///
    /// let requirement: Requirement = payload.parse()?;
    /// let routed = requirement.route(&replicas, Duration::from_millis(200)).await;
    /// let (n,): (i64,) = sqlx::query_as("select count(*) from posts")
    ///     .fetch_one(routed.pool)
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn route<'b, B: Backend>(
        &self,
        backend: &'b B,
        max_wait: Duration,
    ) -> Routed<'b, B::Pool> {
        match *self {
            Requirement::Nothing => {
                let mut routed = backend.eventual();
                if routed.target == Target::Replica {
                    routed.reason = RouteReason::NoToken;
                }
                routed
            }
            Requirement::Position(position) => backend.session(position, max_wait).await,
            Requirement::Primary => {
                Routed::primary(backend.primary(), RouteReason::PositionUnknown)
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Nothing => f.write_str("none"),
            Requirement::Primary => f.write_str("primary"),
            Requirement::Position(p) => write!(f, "{}@{}:{}", p.lsn, p.timeline, p.system_id),
        }
    }
}

/// The text was not a [`Requirement`] in its text form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a read-after-write requirement (expected `none`, `primary` or `<lsn>@<timeline>:<system id>`, e.g. `0/16B3748@1:7301234567`)"
)]
pub struct ParseRequirementError;

impl FromStr for Requirement {
    type Err = ParseRequirementError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "none" => Ok(Requirement::Nothing),
            "primary" => Ok(Requirement::Primary),
            text => {
                let (lsn, rest) = text.split_once('@').ok_or(ParseRequirementError)?;
                let (timeline, system_id) = rest.split_once(':').ok_or(ParseRequirementError)?;
                let lsn: Lsn = lsn.parse().map_err(|_| ParseRequirementError)?;
                let timeline: u32 = timeline.parse().map_err(|_| ParseRequirementError)?;
                let system_id: u64 = system_id.parse().map_err(|_| ParseRequirementError)?;
                let position = WritePosition::new(lsn, timeline, system_id);
                if position.pins_primary() {
                    return Ok(Requirement::Primary);
                }
                Ok(Requirement::Position(position))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        for requirement in [
            Requirement::Nothing,
            Requirement::Primary,
            Requirement::Position(WritePosition::new(Lsn::new(u64::MAX), u32::MAX, u64::MAX)),
            Requirement::Position(WritePosition::new(Lsn::new(0x28), 2, 1)),
        ] {
            assert_eq!(requirement.to_string().parse(), Ok(requirement));
        }
        for bad in [
            "",
            "0/1",
            "0/1@1",
            "0/1@x:1",
            "@1:2",
            "0/1@1:",
            "Primary",
            "0/1@1:2:3",
        ] {
            assert_eq!(
                bad.parse::<Requirement>(),
                Err(ParseRequirementError),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_write_never_lowers_the_requirement() {
        let at = |lsn, timeline| WritePosition::new(Lsn::new(lsn), timeline, 7);
        let carried = Requirement::Position(at(900, 1));
        assert_eq!(
            carried.after_write(at(1_000, 1)),
            Requirement::Position(at(1_000, 1))
        );
        assert_eq!(carried.after_write(at(500, 1)), carried);
        // A newer timeline is the cluster's later history.
        assert_eq!(
            carried.after_write(at(500, 2)),
            Requirement::Position(at(500, 2))
        );
        assert_eq!(
            Requirement::Primary.after_write(at(5, 1)),
            Requirement::Position(at(5, 1))
        );
        assert_eq!(
            Requirement::Nothing.after_write(WritePosition::default()),
            Requirement::Primary
        );
    }
}
