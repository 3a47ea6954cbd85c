//! A listener's routing rules as data: the role it serves, how it balances, and the filters
//! for read roles. Plain types with no logic of patroxy's and no imports of its modules, so
//! configuration, routing and the operator's view can all name them.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerRole {
    /// The member named by the leader key.
    #[default]
    Primary,
    /// Running, eligible replicas only.
    Replica,
    /// Eligible replicas; the primary when none is left.
    PreferReplica,
    /// Every running member: the primary and eligible replicas.
    Any,
    /// Only the synchronous standbys named in the `sync` key.
    Sync,
}

impl ListenerRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerRole::Primary => "primary",
            ListenerRole::Replica => "replica",
            ListenerRole::PreferReplica => "prefer-replica",
            ListenerRole::Any => "any",
            ListenerRole::Sync => "sync",
        }
    }

    /// What the server's `in_hot_standby` must say at connect: `Some(false)` for a primary,
    /// `Some(true)` for a replica, `None` when either will do.
    pub fn wants_standby(self) -> Option<bool> {
        match self {
            ListenerRole::Primary => Some(false),
            ListenerRole::Replica | ListenerRole::Sync => Some(true),
            ListenerRole::PreferReplica | ListenerRole::Any => None,
        }
    }
}

impl fmt::Display for ListenerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a listener spreads sessions over its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Fewest sessions through this patroxy first; ties take turns.
    #[default]
    LeastConnections,
    RoundRobin,
}

/// A listener's routing rules.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub role: ListenerRole,
    pub balance: Balance,
    /// Replicas further behind the leader than this many bytes take no sessions.
    pub max_lag: Option<u64>,
    /// Replicas must carry each of these Patroni tags with this value.
    pub require_tags: BTreeMap<String, Value>,
    /// Replicas carrying any of these tags with this value are left out.
    pub exclude_tags: BTreeMap<String, Value>,
}
