//! An endpoint under test: a name and a libpq-style connection string, over TLS when the
//! string says `sslmode=require`.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Clone)]
pub struct Endpoint {
    pub name: String,
    pub conninfo: String,
    /// Set by `with_ca` for endpoints whose conninfo asks for TLS.
    pub tls: Option<MakeRustlsConnect>,
}

/// Gives the endpoints that ask for TLS (`sslmode=require`) a connector trusting `ca`.
pub fn with_ca(mut endpoints: Vec<Endpoint>, ca: Option<&Path>) -> anyhow::Result<Vec<Endpoint>> {
    let wants_tls = |e: &Endpoint| e.conninfo.contains("sslmode=require");
    let Some(ca) = ca else {
        if let Some(e) = endpoints.iter().find(|e| wants_tls(e)) {
            anyhow::bail!("endpoint {} asks for TLS: give --ca", e.name);
        }
        return Ok(endpoints);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = MakeRustlsConnect::new(config);
    for e in endpoints.iter_mut().filter(|e| wants_tls(e)) {
        e.tls = Some(connector.clone());
    }
    Ok(endpoints)
}

impl FromStr for Endpoint {
    type Err = String;

    /// `name=conninfo`, e.g. `patroxy=host=127.0.0.1 port=6432 user=postgres dbname=postgres`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, conninfo) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=CONNINFO"))?;
        if name.is_empty() || name.contains(' ') || conninfo.trim().is_empty() {
            return Err(format!("{s:?}: expected NAME=CONNINFO"));
        }
        Ok(Endpoint {
            name: name.to_owned(),
            conninfo: conninfo.to_owned(),
            tls: None,
        })
    }
}

impl Endpoint {
    /// Connects, driving the connection on its own task.
    pub async fn connect(&self, timeout: Duration) -> Result<Client, String> {
        match &self.tls {
            Some(tls) => connect(&self.conninfo, tls.clone(), timeout).await,
            None => connect(&self.conninfo, NoTls, timeout).await,
        }
    }
}

async fn connect<T>(conninfo: &str, tls: T, timeout: Duration) -> Result<Client, String>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let connect = tokio_postgres::connect(conninfo, tls);
    let (client, conn) = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| format!("connect timed out after {timeout:?}"))?
        .map_err(|e| describe(&e))?;
    tokio::spawn(conn);
    Ok(client)
}

/// An error in one line: the SQLSTATE and message when the server (or a proxy) sent one.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}
