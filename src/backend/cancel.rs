//! Cancel routing. Unpooled clients see the server's own BackendKeyData, untouched; pooled
//! clients get patroxy's own key, whose pid carries this instance's tag. A CancelRequest goes
//! to the server this instance knows the key for. A key it does not know was issued through
//! another patroxy instance: a tagged key goes to the instance with that tag (the peers
//! publish theirs in their routing reports), any other key to every member of the cluster.
//! A server ignores a key it did not issue, so the broadcast is correct with any number of
//! instances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::discovery::patroni::Endpoint;
use crate::discovery::Topology;
use crate::protocol::messages;
use crate::protocol::startup::CancelKey;

/// Where each live session's cancel key goes: the server, and the key to send it (the
/// server's own; for a pooled session, the key of the server connection it holds).
#[derive(Debug, Clone, Default)]
pub struct CancelRegistry {
    keys: Arc<Mutex<HashMap<CancelKey, (Endpoint, CancelKey)>>>,
}

/// Removes its key from the registry when the session ends, on every exit path.
#[derive(Debug)]
pub struct Registration {
    registry: CancelRegistry,
    key: CancelKey,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, (Endpoint, CancelKey)>> {
        // A panic elsewhere while holding the lock leaves a usable map.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client's `key` cancels on `server` with `server_key`.
    pub fn register(
        &self,
        key: CancelKey,
        server: Endpoint,
        server_key: CancelKey,
    ) -> Registration {
        self.lock().insert(key.clone(), (server, server_key));
        Registration {
            registry: self.clone(),
            key,
        }
    }

    pub fn lookup(&self, key: &CancelKey) -> Option<(Endpoint, CancelKey)> {
        self.lock().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pids of PostgreSQL backends stay below 2^22 (Linux's largest `pid_max`), so a pid of
/// 2^23 or more is patroxy's: its bits from 15 up are the issuing instance's tag.
const TAG_SHIFT: u32 = 15;
const MIN_TAG: u16 = 1 << (23 - TAG_SHIFT);

/// A random tag for this instance, never one a server pid could carry.
pub fn new_tag() -> u16 {
    let r = u16::from_be_bytes(crate::auth::scram::random());
    MIN_TAG + r % (u16::MAX - MIN_TAG)
}

/// A fresh key for a pooled client of the instance tagged `tag`: the tag and random bits
/// in the pid, a random secret.
pub fn tagged_key(tag: u16) -> CancelKey {
    let bytes: [u8; 6] = crate::auth::scram::random();
    let low = i32::from(u16::from_be_bytes([bytes[0], bytes[1]])) & ((1 << TAG_SHIFT) - 1);
    CancelKey {
        pid: (i32::from(tag) << TAG_SHIFT) | low,
        secret: Bytes::copy_from_slice(&bytes[2..6]),
    }
}

/// The tag of the instance that issued `key`, if a patroxy instance did.
pub fn tag_of(key: &CancelKey) -> Option<u16> {
    let tag = u16::try_from(key.pid >> TAG_SHIFT).ok()?;
    (tag >= MIN_TAG).then_some(tag)
}

/// Every member with an address: where a key no instance issued goes.
pub fn members(t: &Topology) -> Vec<Endpoint> {
    let mut all: Vec<Endpoint> = t
        .members
        .values()
        .filter_map(|m| m.endpoint.clone())
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Sends the cancel request to each target at once. Returns how many servers took it.
pub async fn deliver(key: &CancelKey, targets: Vec<Endpoint>, connect_timeout: Duration) -> usize {
    let packet = messages::cancel_request(key);
    let mut sends = JoinSet::new();
    for ep in targets {
        sends.spawn(send_one(ep, packet.clone(), connect_timeout));
    }
    let mut delivered = 0;
    while let Some(r) = sends.join_next().await {
        if matches!(r, Ok(Ok(()))) {
            delivered += 1;
        }
    }
    delivered
}

async fn send_one(ep: Endpoint, packet: Bytes, connect_timeout: Duration) -> std::io::Result<()> {
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let mut s = timeout(
        connect_timeout,
        TcpStream::connect((ep.host.as_str(), ep.port)),
    )
    .await
    .map_err(|_| timed_out())??;
    s.write_all(&packet).await?;
    // The server closes once it has handled the request; wait for that, as libpq does.
    let mut sink = [0u8; 64];
    timeout(connect_timeout, async {
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| timed_out())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::tests::topology;

    fn key(pid: i32) -> CancelKey {
        CancelKey {
            pid,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        }
    }

    #[test]
    fn registrations_end_with_their_guard() {
        let reg = CancelRegistry::default();
        let ep = Endpoint::parse("127.0.0.1:5001").unwrap();
        let guard = reg.register(key(1), ep.clone(), key(7));
        assert_eq!(reg.lookup(&key(1)), Some((ep, key(7))));
        assert_eq!(reg.lookup(&key(2)), None);
        drop(guard);
        assert!(reg.is_empty());
    }

    #[test]
    fn pooled_keys_carry_their_instance_and_server_keys_do_not() {
        for _ in 0..1000 {
            let tag = new_tag();
            assert!(tag >= MIN_TAG);
            let k = tagged_key(tag);
            assert!(k.pid > 0);
            assert_eq!(tag_of(&k), Some(tag));
            assert_eq!(k.secret.len(), 4);
        }
        // Any pid a Linux server can have (pid_max is at most 2^22).
        for pid in [1, 4_194_304, (1 << 23) - 1] {
            assert_eq!(tag_of(&key(pid)), None, "{pid}");
        }
        assert_eq!(tag_of(&key(-5)), None);
    }

    #[test]
    fn unknown_keys_go_to_every_member() {
        let t = topology(Some("a"), &[("a", 5001, "running"), ("b", 5002, "stopped")]);
        let ports: Vec<u16> = members(&t).iter().map(|e| e.port).collect();
        assert_eq!(ports, vec![5001, 5002]);
    }
}
