//! The running state that the operator surfaces read (the admin endpoint, the routing
//! reports): each cluster's topology and watch health, the listeners being served, this
//! instance's sessions per server, and the configuration in force. The server and discovery
//! write it; nothing here depends on them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::watch;

use crate::backend::pool::Pools;
use crate::backend::ServerLoad;
use crate::config::{Config, Dcs};
use crate::discovery::{DcsContact, Topology};
use crate::peers::Peers;
use crate::view::{self, InstanceView, Served};

/// Each cluster's topology, by cluster name.
pub type Topologies = HashMap<String, watch::Receiver<Arc<Topology>>>;

/// The listeners being served now.
pub type Serving = watch::Receiver<Vec<Served>>;

/// What this instance is doing, for whoever reports on it.
#[derive(Clone)]
pub struct Running {
    /// The instance name when `report.instance` is not set: `<hostname>-<pid>`.
    pub default_instance: String,
    pub topologies: Topologies,
    /// Per cluster: its link to etcd (the watch, its endpoint, the last answer).
    pub contacts: BTreeMap<String, Arc<DcsContact>>,
    pub serving: Serving,
    /// Sessions per server, across listeners.
    pub load: ServerLoad,
    /// The configuration in force: reloads replace it.
    pub config: watch::Receiver<Arc<Config>>,
    /// Server connection pools of pooled listeners.
    pub pools: Arc<Pools>,
    /// The tag in the pids of this instance's cancel keys.
    pub cancel_tag: u16,
    /// The cancel routes read from the instances' reports.
    pub peers: Peers,
}

impl Running {
    /// This instance's name, as in its etcd reports.
    pub fn instance(&self) -> String {
        let configured = self.config.borrow().report.instance.clone();
        configured.unwrap_or_else(|| self.default_instance.clone())
    }

    /// Where peers send cancel requests with this instance's keys for `cluster`: a
    /// listener of the cluster (a pooled one first), at `report.address` or at the IP it is bound to
    /// (none when it listens on every address and no `report.address` says which).
    pub fn cancel_route(&self, cluster: &str) -> Option<view::CancelRoute> {
        let host = self.config.borrow().report.address.clone();
        let serving = self.serving.borrow();
        let bound: std::net::SocketAddr = serving
            .iter()
            .filter(|l| l.cluster == cluster)
            .max_by_key(|l| l.pooled)?
            .listen
            .parse()
            .ok()?;
        let address = match host {
            Some(h) => {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                match h.contains(':') {
                    true => format!("[{h}]:{}", bound.port()),
                    false => format!("{h}:{}", bound.port()),
                }
            }
            None if bound.ip().is_unspecified() => return None,
            None => bound.to_string(),
        };
        Some(view::CancelRoute {
            tag: self.cancel_tag,
            address,
        })
    }

    /// The operator's view of everything this instance knows (`/topology`, reports).
    pub fn view(&self) -> InstanceView {
        let topologies: BTreeMap<String, Arc<Topology>> = self
            .topologies
            .iter()
            .map(|(name, rx)| (name.clone(), rx.borrow().clone()))
            .collect();
        let listeners = self.serving.borrow().clone();
        let load = &self.load;
        let pools = self.pools.views();
        let mut v = view::instance(
            &self.instance(),
            &topologies,
            &listeners,
            &|ep| load.sessions(ep),
            pools,
        );
        for c in &mut v.clusters {
            c.dcs = self.contacts.get(&c.name).map(|contact| view::DcsView {
                kind: contact.dcs().as_str().to_owned(),
                endpoint: contact.endpoint(),
                watching: contact.watching(),
                silent_ms: contact.silent_for().map(|d| d.as_millis() as u64),
            });
        }
        v.peers = self.peers.views();
        v
    }

    /// Each cluster's DCS, whether it is up, and how long it has been silent, for `/metrics`.
    pub fn dcs_links(&self) -> Vec<(String, &'static str, bool, Option<std::time::Duration>)> {
        self.contacts
            .iter()
            .map(|(name, c)| (name.clone(), c.dcs().as_str(), c.watching(), c.silent_for()))
            .collect()
    }

    /// Ready when every cluster is watched and has a routable primary; otherwise the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for (name, contact) in &self.contacts {
            if !contact.watching() {
                let dcs = contact.dcs().describe();
                let what = match contact.dcs() {
                    Dcs::Etcd | Dcs::Zookeeper => format!("the {dcs} watch is down"),
                    Dcs::Rest => format!("no fresh answer from {dcs}"),
                };
                let silent = match contact.silent_for() {
                    Some(d) => format!("no answer from {dcs} for {:.1} s", d.as_secs_f64()),
                    None => format!("{dcs} has not answered yet"),
                };
                problems.push(format!("{name}: {what} ({silent})"));
            }
        }
        for (name, rx) in &self.topologies {
            let t = rx.borrow();
            // A polled snapshot past its budget: what routing refuses by, not a round later.
            let silent = self.contacts.get(name).and_then(|c| c.silent_for());
            let contact_up = self.contacts.get(name).is_some_and(|c| c.watching());
            if let Some(why) = crate::routing::etcd_loss::unknown(&t, silent).filter(|_| contact_up)
            {
                problems.push(format!("{name}: {why}"));
            }
            if let Err(why) = crate::routing::primary(&t) {
                problems.push(format!("{name}: {why}"));
            }
        }
        problems.sort();
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems),
        }
    }
}
