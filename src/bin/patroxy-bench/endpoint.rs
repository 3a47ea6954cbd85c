//! An endpoint under test: a name and a libpq-style connection string.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub conninfo: String,
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
        })
    }
}

impl Endpoint {
    /// Connects, driving the connection on its own task.
    pub async fn connect(&self, timeout: Duration) -> Result<Client, String> {
        let connect = tokio_postgres::connect(&self.conninfo, NoTls);
        let (client, conn) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| format!("connect timed out after {timeout:?}"))?
            .map_err(|e| describe(&e))?;
        tokio::spawn(conn);
        Ok(client)
    }
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
