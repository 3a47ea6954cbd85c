//! The connect loop: wait for candidates, try them in balanced order (one server handshake
//! each, `handshake.rs`), and retry against the current topology within `connect_wait`.
//!
//! Until the client has seen a byte from a server, every failure moves on to the next
//! candidate. After that, the client is committed to this server, since credentials cannot
//! be replayed.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::watch;
use tokio::time::Instant;

use super::handshake::{attempt, Attempt, AttemptContext};
use super::{Backend, ConnectError, LoadGuard, ServerLoad};
use crate::backoff::Backoff;
use crate::config::Timeouts;
use crate::discovery::Topology;
use crate::protocol::frame::FrameError;
use crate::protocol::startup::{CancelKey, StartupInfo};
use crate::routing::{self, ListenerRole, Policy, Target};
use crate::stream::Stream;
use crate::tls::ServerTls;

/// Client frames during authentication: PostgreSQL caps auth tokens at 64 KiB.
pub(super) const CLIENT_AUTH_FRAME_LIMIT: usize = 65_536 + 5;
/// Pause before retrying targets that failed, growing up to the max, unless the topology
/// changes first: many waiting clients must not hammer a dead server.
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);

/// What the connect loop needs to know of the listener it connects a client for.
pub struct ConnectParams<'a> {
    /// The listener's name, for metrics.
    pub listener: &'a str,
    pub policy: &'a Policy,
    /// This session's turn, for balancing.
    pub turn: usize,
    pub server_tls: &'a ServerTls,
    pub timeouts: &'a Timeouts,
    pub load: &'a ServerLoad,
    /// Why the listener refuses new connections under this topology now, if it does (the
    /// etcd-loss policy): the client is told at once.
    pub refusal: &'a (dyn Fn(&Topology) -> Option<String> + Sync),
    /// The cancel key the client is given instead of the server's (patroxy's own, tagged).
    pub client_key: Option<&'a CancelKey>,
}

/// Connects the client to a server for the listener, authenticating end to end.
/// `client_buf` holds client bytes already read and receives any more read during connect.
/// The returned guard counts the session against its server's load.
pub async fn establish(
    client: &mut Stream,
    client_buf: &mut BytesMut,
    startup: &StartupInfo,
    params: &ConnectParams<'_>,
    topology: &mut watch::Receiver<Arc<Topology>>,
) -> Result<(Backend, LoadGuard), ConnectError> {
    let policy = params.policy;
    let started = Instant::now();
    let deadline = started + params.timeouts.connect_wait;
    let no_server = |why: String| ConnectError::NoServer {
        role: policy.role,
        waited: started.elapsed(),
        why,
    };
    let mut pause = Backoff::new(RETRY_PAUSE_MIN, RETRY_PAUSE_MAX);
    loop {
        let candidates = wait_for_candidates(params, topology, client, client_buf, deadline)
            .await
            .map_err(|e| match e {
                WaitError::Deadline(why) => no_server(why),
                WaitError::Client(e) => e,
            })?;
        let now = Instant::now();
        let load = params.load;
        let mut ordered = routing::order(candidates, policy, |ep| load.sessions(ep), params.turn);
        // Servers that just failed go last: tried only when nothing else works.
        ordered.sort_by_key(|t| load.is_ejected(&t.endpoint, now));
        let mut why = String::new();
        for target in ordered {
            let claim = load.claim(&target.endpoint);
            let ctx = AttemptContext {
                target: &target,
                role: policy.role,
                server_tls: params.server_tls,
                timeouts: params.timeouts,
                started,
                deadline,
                client_key: params.client_key,
            };
            match attempt(client, client_buf, startup, ctx, topology).await {
                Attempt::Done(backend) => return Ok((backend, claim)),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(w) => {
                    tracing::debug!(server = %target.endpoint, why = %w, "connect attempt failed");
                    // A primary is the only target of its role: ejecting it would only delay.
                    if policy.role != ListenerRole::Primary {
                        load.eject(&target.endpoint, Instant::now() + params.timeouts.eject);
                    }
                    why = w;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if Instant::now() >= deadline {
            return Err(no_server(why));
        }
        // Retry after a pause, or at once if the topology moves; a client that gives up
        // meanwhile is not connected for later.
        let wake = (Instant::now() + pause.next_pause()).min(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = topology.changed() => {}
            r = read_client(client, client_buf) => r?,
        }
        if Instant::now() >= deadline {
            return Err(no_server(why));
        }
    }
}

enum WaitError {
    Deadline(String),
    Client(ConnectError),
}

/// Waits until the topology has candidates for the policy, watching the client for a hang-up.
async fn wait_for_candidates(
    params: &ConnectParams<'_>,
    topology: &mut watch::Receiver<Arc<Topology>>,
    client: &mut Stream,
    client_buf: &mut BytesMut,
    deadline: Instant,
) -> Result<Vec<Target>, WaitError> {
    let mut waiting = None;
    loop {
        let snapshot = topology.borrow_and_update().clone();
        if let Some(why) = (params.refusal)(&snapshot) {
            return Err(WaitError::Deadline(why));
        }
        let why = match routing::candidates(params.policy, &snapshot) {
            Ok(c) => return Ok(c),
            Err(why) => why.to_string(),
        };
        // Counted as waiting for as long as there is nothing to connect to.
        waiting.get_or_insert_with(|| crate::metrics::WaitingGauge::new(params.listener));

        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Err(WaitError::Deadline(why)),
            changed = topology.changed() => {
                if changed.is_err() {
                    // Discovery is gone (shutdown): nothing will change any more.
                    return Err(WaitError::Deadline(why));
                }
            }
            r = read_client(client, client_buf) => r.map_err(WaitError::Client)?,
        }
    }
}

/// Reads more client bytes, bounded: a client may pipeline a little, never a lot, before auth.
pub(super) async fn read_client(
    client: &mut Stream,
    buf: &mut BytesMut,
) -> Result<(), ConnectError> {
    use tokio::io::AsyncReadExt;
    if buf.len() > CLIENT_AUTH_FRAME_LIMIT {
        return Err(ConnectError::ClientProtocol(FrameError::TooLong {
            tag: '?',
            len: buf.len() as i64,
            limit: CLIENT_AUTH_FRAME_LIMIT,
        }));
    }
    match client.read_buf(buf).await {
        Ok(0) => Err(ConnectError::ClientGone),
        Ok(_) => Ok(()),
        Err(e) => Err(ConnectError::ClientIo(e)),
    }
}
