//! The other patroxy instances of a cluster, as their routing reports in etcd describe them:
//! which one issued a pooled cancel key, and where it takes cancel requests. Read when a
//! cancel needs it (cancels are rare), so no peer list is kept or configured.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Config;
use crate::discovery::patroni::Endpoint;
use crate::etcd::{read_prefix, Etcd};
use crate::view::Report;

/// Finds peers through their reports.
#[derive(Clone)]
pub struct Peers {
    pub etcd: Etcd,
    /// The configuration in force: where reports are kept.
    pub config: watch::Receiver<Arc<Config>>,
}

impl Peers {
    /// Where the instance tagged `tag` takes cancel requests for `cluster`, if one of the
    /// cluster's reports names it. An etcd failure is logged and counts as not found.
    pub async fn cancel_address(&self, cluster: &str, tag: u16) -> Option<Endpoint> {
        let prefix = self.config.borrow().report.cluster_prefix(cluster);
        let limit = self.etcd.config.request_timeout;
        let read = async {
            let mut client = self.etcd.connect().await?;
            read_prefix(&mut client, &prefix, limit).await
        };
        let reports = match read.await {
            Ok((keys, _)) => keys,
            Err(e) => {
                tracing::warn!(cluster, error = %e, "could not read the peers' reports");
                return None;
            }
        };
        reports
            .values()
            .filter_map(|v| serde_json::from_slice::<Report>(v).ok())
            .find_map(|r| r.cancel.filter(|c| c.tag == tag))
            .and_then(|c| Endpoint::parse(&c.address))
    }
}
