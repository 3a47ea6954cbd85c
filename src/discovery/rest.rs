//! The REST source, for Patroni clusters patroxy cannot watch (Kubernetes, Consul, Raft):
//! `GET /cluster` every `poll_interval` from one member at a time, moving to the next member
//! when one fails, and the leader it names confirmed by that member's own `/leader` before
//! it is routed to. A leader that answers it holds no lock (demoted) is published as no
//! leader, and so is one whose REST port refuses connections (its Patroni is gone); one
//! that does not answer in time makes the round unanswered, so a busy leader's sessions are
//! not drained. With no answer for `stale_after` the link counts as down, and routing
//! refuses new connections rather than follow the last answer (see `routing::etcd_loss`).
//!
//! Nothing of an answer is used before it says it is about the configured scope
//! (`/cluster`'s own `scope` where Patroni gives one, else the answering member's
//! `/patroni`, asked once until it fails), and the leader's `/leader` must say so too.
//!
//! Requests are made one after the other, so there is never more than one in flight per
//! member, and each is bounded by `request_timeout`.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::cluster_api::{self, ClusterApiError};
use super::http_get::{GetError, Getter};
use super::publish::Publisher;
use super::{DcsContact, Topology};
use crate::config::RestConfig;

/// How long a member's own word on its scope is taken (the server behind a URL can change
/// without a failed poll: a name that moves, an address reused).
const VERIFIED_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// A failing member is logged at most this often.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("{0}")]
    Get(#[from] GetError),
    #[error("answered {0}")]
    Status(u16),
    #[error("{0}")]
    Answer(#[from] ClusterApiError),
    #[error(
        "answers for cluster {theirs:?}, not {ours:?}: rest.urls names another cluster's members"
    )]
    Scope { theirs: String, ours: String },
    /// The leader an answer named, not the member that gave it.
    #[error("its leader's API at {base}: {error}")]
    Leader { base: String, error: Box<PollError> },
}

/// Polls one cluster's members and publishes its topology.
pub struct RestPoller {
    name: String,
    /// Patroni's `scope`: an answer about another one is refused.
    scope: String,
    config: RestConfig,
    getter: Getter,
    contact: Arc<DcsContact>,
    /// The member asked first: the last one that answered.
    next: usize,
    /// When each member's failure was last logged.
    reported: Vec<Option<Instant>>,
    /// When each member's own status last said it is of `scope` (Patroni 3.0 names none in
    /// `/cluster`): taken for `VERIFIED_FOR`, or until the member next fails.
    verified: Vec<Option<Instant>>,
    /// A leader's API that did not answer `/leader` in time, and until when it is not asked
    /// again (nor asked for `/cluster`): each member naming a frozen leader would cost a
    /// `request_timeout`, and delay the round that can see its successor.
    silent: Option<(String, Instant)>,
}

impl RestPoller {
    pub fn new(
        name: String,
        scope: String,
        config: RestConfig,
        contact: Arc<DcsContact>,
    ) -> Result<RestPoller, crate::tls::TlsError> {
        let getter = Getter::new(&config)?;
        let reported = vec![None; config.urls.len()];
        let verified = vec![None; config.urls.len()];
        Ok(RestPoller {
            name,
            scope,
            config,
            getter,
            contact,
            next: 0,
            reported,
            verified,
            silent: None,
        })
    }

    /// Runs until `shutdown`, publishing snapshots into `tx`.
    pub async fn run(mut self, tx: Arc<watch::Sender<Arc<Topology>>>, shutdown: CancellationToken) {
        let mut tx = Publisher::new(&self.name, tx);
        info!(cluster = %self.name, urls = ?self.config.urls, every = ?self.config.poll_interval, "polling Patroni's REST API");
        let mut tick = tokio::time::interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let answer = tokio::select! {
                a = self.round() => a,
                _ = shutdown.cancelled() => return,
            };
            if let Some((mut t, url)) = answer {
                t.stale_after = Some(self.config.stale_after);
                tx.publish(t, 0);
                self.contact.watching_on(&url);
            }
            let stale = self
                .contact
                .silent_for()
                .map_or(true, |s| s > self.config.stale_after);
            if stale && self.contact.watching() {
                warn!(cluster = %self.name, budget = ?self.config.stale_after, "no fresh answer from Patroni's REST API: the cluster's state is unknown until one comes");
                self.contact.lost();
            }
        }
    }

    /// One poll: the members in turn, from the last that answered, until one names a
    /// leader that confirms. An answer whose leader does not confirm is kept as the round's
    /// answer (with no leader) only if no other member gives a confirmed one: a member with
    /// a stale view must not hide one with a current view.
    async fn round(&mut self) -> Option<(Topology, String)> {
        let n = self.config.urls.len();
        let mut unconfirmed = None;
        for k in 0..n {
            let i = (self.next + k) % n;
            let url = self.config.urls[i].clone();
            if self.silent_now(url.trim_end_matches('/')) {
                continue;
            }
            match self.ask(i, &url).await {
                Ok((t, true)) => {
                    self.next = i;
                    return Some((t, url));
                }
                Ok((t, false)) => {
                    unconfirmed.get_or_insert((i, t, url));
                }
                Err(e) => {
                    if !matches!(e, PollError::Leader { .. }) {
                        self.verified[i] = None;
                    }
                    crate::metrics::dcs_error(&self.name, "rest");
                    self.report(i, &url, &e);
                }
            }
        }
        let (i, t, url) = unconfirmed?;
        self.next = i;
        Some((t, url))
    }

    /// `/cluster` from member `i` at `url`, and whether its leader confirmed (a leader
    /// that answers anything but 200 on its `/leader` is taken away; one that does not
    /// answer at all makes the whole answer unusable, so a slow leader never drains its
    /// sessions: `stale_after` decides). Nothing of an answer is used before it is known to
    /// be about this cluster's scope.
    async fn ask(&mut self, i: usize, url: &str) -> Result<(Topology, bool), PollError> {
        let (status, body) = self.getter.get(url, "/cluster").await?;
        if status != 200 {
            return Err(PollError::Status(status));
        }
        match cluster_api::scope_of(&body) {
            Some(theirs) => self.same_scope(Some(theirs))?,
            None if !self.verified[i].is_some_and(|at| at.elapsed() < VERIFIED_FOR) => {
                let (_, own) = self.getter.get(url, "/patroni").await?;
                self.same_scope(cluster_api::scope_of(&own))?;
                self.verified[i] = Some(Instant::now());
            }
            None => {}
        }
        let mut t = cluster_api::parse(&body)?;
        crate::metrics::dcs_read(&self.name, "rest");
        let Some(leader) = t.leader.clone() else {
            return Ok((t, false));
        };
        if self
            .confirms(&t, &leader, cluster_api::paused(&body))
            .await?
        {
            return Ok((t, true));
        }
        // Its claim is not routed, for writes or (by its role) for reads.
        t.leader = None;
        t.sync = None;
        Ok((t, false))
    }

    /// Whether `leader` says itself, on its own REST API, that it holds the leader lock,
    /// as a member of this cluster's scope. The credentials go with the request only when
    /// its address is one of `rest.urls`.
    async fn confirms(
        &mut self,
        t: &Topology,
        leader: &str,
        paused: bool,
    ) -> Result<bool, PollError> {
        let base = t
            .members
            .get(leader)
            .and_then(|m| cluster_api::api_base(m.api_url.as_deref()?));
        let Some(base) = base else {
            return Ok(false);
        };
        let failed = |base: String, error: PollError| PollError::Leader {
            base,
            error: Box::new(error),
        };
        let limit = self.config.request_timeout;
        if self.silent_now(&base) {
            return Err(failed(base, GetError::Timeout(limit).into()));
        }
        let configured = self
            .config
            .urls
            .iter()
            .any(|u| u.trim_end_matches('/') == base);
        match self.getter.get_as(&base, "/leader", configured).await {
            Ok((200, body)) => {
                let scope = self.same_scope(cluster_api::scope_of(&body));
                scope.map_err(|e| failed(base, e))?;
                Ok(true)
            }
            // In a paused cluster Patroni is restarted under a running PostgreSQL (an
            // upgrade) and says no until its first cycle, while its lock stays: that says
            // nothing of the lock, and the round is unanswered.
            Ok((status, _)) if paused => Err(failed(base, PollError::Status(status))),
            Ok(_) => Ok(false),
            // Nothing listens there: its Patroni is gone, and so is its claim. Any other
            // failure to connect (a name that does not resolve, no route, no descriptors
            // left here) says nothing of it: the round is unanswered.
            Err(GetError::Connect(e))
                if e.kind() == std::io::ErrorKind::ConnectionRefused && !paused =>
            {
                Ok(false)
            }
            Err(e) => {
                if matches!(e, GetError::Timeout(_)) {
                    self.silent = Some((base.clone(), Instant::now() + limit));
                }
                Err(failed(base, e.into()))
            }
        }
    }

    /// Whether the API at `base` timed out on `/leader` within the last `request_timeout`.
    fn silent_now(&self, base: &str) -> bool {
        self.silent
            .as_ref()
            .is_some_and(|(b, until)| b == base && Instant::now() < *until)
    }

    /// An answer must say it is about this cluster's scope: a URL of another cluster's
    /// member must not route this cluster's clients there.
    fn same_scope(&self, theirs: Option<String>) -> Result<(), PollError> {
        match theirs {
            Some(theirs) if theirs == self.scope => Ok(()),
            theirs => Err(PollError::Scope {
                theirs: theirs.unwrap_or_else(|| "(none)".into()),
                ours: self.scope.clone(),
            }),
        }
    }

    /// A line per member every `REPORT_EVERY`, not one per poll.
    fn report(&mut self, i: usize, url: &str, e: &PollError) {
        let now = Instant::now();
        let Some(at) = self.reported.get_mut(i) else {
            return;
        };
        if at.is_some_and(|t| now - t < REPORT_EVERY) {
            return;
        }
        *at = Some(now);
        warn!(cluster = %self.name, %url, error = %e, "Patroni's REST API did not answer; asking the other members");
    }
}
