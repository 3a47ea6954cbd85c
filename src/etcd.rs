//! The etcd plumbing shared by discovery, the routing report and `patroxy status`: connecting
//! (endpoints, TLS, user and password), one bounded request, and a prefix read. PEM files are
//! read once, off the runtime, when the connector is made; reconnects reuse the bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use tokio::time::timeout;

use crate::config::EtcdConfig;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("reading {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("the watch was canceled by etcd (compact revision {compact_revision}): {reason}")]
    Canceled {
        compact_revision: i64,
        reason: String,
    },
    #[error("the watch stream ended")]
    StreamEnded,
    #[error("no message on the watch for {0:?}")]
    Silent(Duration),
    #[error("the lease expired")]
    LeaseLost,
    #[error("etcd's revision went back from {seen} to {now}")]
    Rewound { seen: i64, now: i64 },
}

/// How to reach etcd: the configuration, and its TLS files already read.
#[derive(Debug, Clone)]
pub struct Etcd {
    pub config: EtcdConfig,
    tls: Option<TlsOptions>,
}

impl Etcd {
    /// Reads the TLS files `config` names (on a blocking thread) into a reusable connector.
    pub async fn new(config: &EtcdConfig) -> Result<Etcd, EtcdError> {
        let c = config.clone();
        let read = tokio::task::spawn_blocking(move || tls_options(&c)).await;
        let tls = read.map_err(|e| EtcdError::File {
            path: "etcd TLS files".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        Ok(Etcd {
            config: config.clone(),
            tls,
        })
    }

    /// A client of every endpoint (etcd-client balances requests over them), within
    /// `request_timeout`.
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let e = &self.config;
        within(
            e.request_timeout,
            Client::connect(&e.endpoints, Some(self.options())),
        )
        .await
    }

    /// A client of one endpoint only, within `request_timeout`.
    pub async fn connect_to(&self, endpoint: &str) -> Result<Client, EtcdError> {
        let limit = self.config.request_timeout;
        within(limit, Client::connect([endpoint], Some(self.options()))).await
    }

    /// Requests require the member to have a raft leader (etcd's `hasleader`): a member cut
    /// off from its quorum refuses them instead of answering from stale data. HTTP/2 pings
    /// find a connection whose peer went silent.
    fn options(&self) -> ConnectOptions {
        let e = &self.config;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(e.dial_timeout)
            .with_keep_alive(Duration::from_secs(5), e.dial_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(u), Some(p)) = (&e.username, &e.password) {
            opts = opts.with_user(u.clone(), p.expose().to_owned());
        }
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.clone());
        }
        opts
    }
}

fn tls_options(e: &EtcdConfig) -> Result<Option<TlsOptions>, EtcdError> {
    if e.ca_file.is_none() && e.cert_file.is_none() {
        return Ok(None);
    }
    let mut tls = TlsOptions::new();
    if let Some(ca) = &e.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(c), Some(k)) = (&e.cert_file, &e.key_file) {
        tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
    }
    Ok(Some(tls))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::File {
        path: path.display().to_string(),
        source,
    })
}

/// One etcd request, bounded by `limit`.
pub async fn within<T>(
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    Ok(timeout(limit, request)
        .await
        .map_err(|_| EtcdError::Timeout(limit))??)
}

/// Every key under `prefix` (made relative to it) and the revision of the read.
pub async fn read_prefix(
    client: &mut Client,
    prefix: &str,
    limit: Duration,
) -> Result<(BTreeMap<String, Bytes>, i64), EtcdError> {
    read_prefix_at_most(client, prefix, limit, 0).await
}

/// The first `most` keys under `prefix` (0: all), as `read_prefix`: etcd sends no more.
pub async fn read_prefix_at_most(
    client: &mut Client,
    prefix: &str,
    limit: Duration,
    most: i64,
) -> Result<(BTreeMap<String, Bytes>, i64), EtcdError> {
    let options = GetOptions::new().with_prefix().with_limit(most);
    let get = client.get(prefix, Some(options));
    let resp = within(limit, get).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let keys = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            relative(prefix, kv.key()).map(|k| (k, Bytes::copy_from_slice(kv.value())))
        })
        .collect();
    Ok((keys, revision))
}

/// `key` without `prefix`, if it is under it and UTF-8.
pub fn relative(prefix: &str, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    key.strip_prefix(prefix).map(str::to_owned)
}
