//! The database roles the app connects as, in the lab and the drills alike,
//! and what the cluster needs for each.
//!
//! A superuser sees every replica's timeline; so does a role with
//! `pg_monitor` (through `pg_read_all_stats`). A plain role, with table
//! privileges only, sees none: it proves what replicas hold by the
//! heartbeat table ([`HEARTBEAT_DDL`]), which [`create_roles`] creates next
//! to the app's tables, so its session reads can go to replicas too.

use std::fmt;

use read_after_write::pg::HEARTBEAT_DDL;
use read_after_write_testkit::{KitError, TestCluster};
use serde::{Deserialize, Serialize};

/// The database role the app connects as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `postgres`: sees every replica's timeline.
    Superuser,
    /// A LOGIN role with `pg_monitor` and the app's table privileges: what
    /// the README recommends.
    Monitor,
    /// A LOGIN role with table privileges only: replicas' timelines are
    /// hidden from it, and the heartbeat table proves them instead.
    Plain,
}

impl Role {
    /// Every role, in table order.
    pub const ALL: [Role; 3] = [Role::Superuser, Role::Monitor, Role::Plain];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Superuser => "superuser",
            Role::Monitor => "monitor",
            Role::Plain => "plain",
        }
    }

    /// The PostgreSQL user the app logs in as.
    pub fn user(self) -> &'static str {
        match self {
            Role::Superuser => "postgres",
            Role::Monitor => "app_monitor",
            Role::Plain => "app_plain",
        }
    }

    /// The URL of the node at `port` on 127.0.0.1 for this role (trust
    /// authentication: no password).
    pub fn url(self, port: u16) -> String {
        format!("postgres://{}@127.0.0.1:{port}/postgres", self.user())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.name() == text)
            .ok_or_else(|| format!("unknown role {text:?}: superuser, monitor or plain"))
    }
}

/// Creates the heartbeat table and the two LOGIN roles, and grants both
/// every table and sequence of `public`: run it on the primary as
/// `postgres` once the schema is in place, so the grants reach every table
/// the app reads. The heartbeat table is among them: a plain role needs
/// `SELECT, INSERT, UPDATE` on it (the library finds it at `connect()`);
/// the monitoring role has it too, and leaves it alone.
pub async fn create_roles(cluster: &TestCluster) -> Result<(), KitError> {
    let monitor = Role::Monitor.user();
    let plain = Role::Plain.user();
    cluster
        .execute_on_primary(&format!(
            "{HEARTBEAT_DDL};
             create role {monitor} login; grant pg_monitor to {monitor};
             create role {plain} login;
             grant select, insert, update, delete on all tables in schema public to {monitor}, {plain};
             grant usage, select on all sequences in schema public to {monitor}, {plain};"
        ))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_parses_back_from_its_name() {
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>(), Ok(role));
        }
        assert!("admin".parse::<Role>().is_err());
        assert_eq!(
            Role::Plain.url(5432),
            "postgres://app_plain@127.0.0.1:5432/postgres"
        );
    }
}
