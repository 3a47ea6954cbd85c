//! `patroxy status`: the clusters as etcd describes them, with the routing reports of every
//! patroxy instance; or one running instance's own view from its admin endpoint.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

use crate::config::{Config, Dcs};
use crate::discovery::Topology;
use crate::etcd::{read_prefix, Etcd, EtcdError};
use crate::view::{self, ClusterView, InstanceView, PoolView, Report};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("{0}")]
    Etcd(#[from] EtcdError),
    #[error("admin endpoint {addr}: {why}")]
    Admin { addr: String, why: String },
    #[error("cluster {cluster} is on {dcs}, not etcd: ask a running patroxy instead (patroxy status --admin host:port)")]
    NotOnEtcd { cluster: String, dcs: &'static str },
}

/// What `patroxy status` shows, and prints with `--json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub clusters: Vec<ClusterView>,
    /// Every instance's report (from etcd); empty when read from an admin endpoint.
    pub reports: Vec<Report>,
    /// The instance's server connection pools (from an admin endpoint; empty from etcd).
    #[serde(default)]
    pub pools: Vec<PoolView>,
}

/// Reads each configured cluster and its reports from etcd.
pub async fn from_etcd(config: &Config) -> Result<Status, StatusError> {
    let limit = config.etcd.request_timeout;
    let mut client = Etcd::new(&config.etcd).await?.connect().await?;
    let mut status = Status {
        clusters: Vec::new(),
        reports: Vec::new(),
        pools: Vec::new(),
    };
    if let Some(c) = config.clusters.iter().find(|c| c.dcs != Dcs::Etcd) {
        return Err(StatusError::NotOnEtcd {
            cluster: c.name(),
            dcs: c.dcs.as_str(),
        });
    }
    for c in &config.clusters {
        let name = c.name();
        let (keys, revision) = read_prefix(&mut client, &c.prefix(), limit).await?;
        let (mut t, _) = Topology::from_keys(&keys);
        // A one-shot read is as current as a watch's first snapshot.
        (t.epoch, t.revision) = (1, revision);
        let mut cluster = view::cluster(&name, &t, None);
        cluster.epoch = 0;
        let prefix = config.report.cluster_prefix(&name);
        let (keys, _) = read_prefix(&mut client, &prefix, limit).await?;
        let reports: Vec<Report> = keys
            .values()
            .filter_map(|v| serde_json::from_slice(v).ok())
            .collect();
        for r in &reports {
            let routes = r
                .routes
                .iter()
                .map(|(l, members)| (format!("{}/{l}", r.instance), members.as_slice()));
            view::mark_routes(&mut cluster, routes);
        }
        status.clusters.push(cluster);
        status.reports.extend(reports);
    }
    Ok(status)
}

/// Asks a running patroxy's admin endpoint (`host:port`) for its `/topology`.
pub async fn from_admin(addr: &str) -> Result<Status, StatusError> {
    let fail = |why: String| StatusError::Admin {
        addr: addr.to_owned(),
        why,
    };
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/topology")
            .header(hyper::header::HOST, addr)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("/topology answered {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice::<InstanceView>(&body.to_bytes()).map_err(|e| e.to_string())
    };
    let view = timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| fail("no answer within 10s".into()))?
        .map_err(fail)?;
    Ok(Status {
        clusters: view.clusters,
        reports: Vec::new(),
        pools: view.pools,
    })
}

/// The tables, one per cluster, each followed by the instances that report on it.
pub fn render(status: &Status) -> String {
    let mut out = status
        .clusters
        .iter()
        .map(|c| {
            let reports: Vec<Report> = status
                .reports
                .iter()
                .filter(|r| r.cluster == c.name)
                .cloned()
                .collect();
            view::table(c, &reports)
        })
        .collect::<Vec<_>>()
        .join("\n");
    if !status.pools.is_empty() {
        out.push_str("\nServer connection pools:\n");
        for p in &status.pools {
            out.push_str(&format!(
                "  {} {}@{} ({}): {} in use, {} idle, of {}; {} waiting\n",
                p.server, p.user, p.database, p.wants, p.in_use, p.idle, p.size, p.waiting
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_follow_the_clusters() {
        let status = Status {
            clusters: Vec::new(),
            reports: Vec::new(),
            pools: vec![PoolView {
                server: "127.0.0.1:5432".into(),
                database: "app".into(),
                user: "alice".into(),
                wants: "primary".into(),
                size: 8,
                idle: 3,
                in_use: 5,
                waiting: 2,
            }],
        };
        let text = render(&status);
        assert!(
            text.contains("127.0.0.1:5432 alice@app (primary): 5 in use, 3 idle, of 8; 2 waiting"),
            "{text}"
        );
        assert!(!render(&Status {
            pools: Vec::new(),
            ..status
        })
        .contains("pools"));
    }
}
