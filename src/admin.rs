//! The admin HTTP endpoint: `/health` (the process answers), `/metrics` (Prometheus), and
//! `/ready` (every cluster's watch is healthy and its primary is known), for Kubernetes
//! probes, load balancers and Prometheus, and `/topology` (the JSON view of `view.rs`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::Topologies;
use crate::router;
use crate::view::{self, InstanceView, ListenerView};

/// The paths the admin endpoint answers.
pub const PATHS: [&str; 4] = ["/health", "/ready", "/metrics", "/topology"];

/// What the admin endpoint reports on.
pub struct AdminState {
    /// This instance's name, as in its etcd reports.
    pub instance: String,
    pub topologies: Topologies,
    /// Per cluster: is its etcd watch established right now?
    pub watching: Vec<(String, Arc<AtomicBool>)>,
    /// The listeners being served.
    pub serving: crate::app::Serving,
    /// Session counts per server.
    pub shared: Arc<crate::session::Shared>,
    /// Renders `/metrics`; `None` when no recorder is installed.
    pub metrics: Option<PrometheusHandle>,
}

impl AdminState {
    /// Ready when every cluster is watched and has a routable primary; otherwise the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for (name, watching) in &self.watching {
            if !watching.load(Ordering::Relaxed) {
                problems.push(format!("{name}: the etcd watch is down"));
            }
        }
        for (name, rx) in &self.topologies {
            if let Err(why) = router::primary(&rx.borrow()) {
                problems.push(format!("{name}: {why}"));
            }
        }
        problems.sort();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

impl AdminState {
    /// `/topology`: each cluster with its members and this instance's sessions on them, and
    /// each listener's routing decision.
    pub fn view(&self) -> InstanceView {
        let listeners = self.serving.borrow().clone();
        let sessions = |ep: &crate::discovery::patroni::Endpoint| self.shared.load.sessions(ep);
        let mut names: Vec<&String> = self.topologies.keys().collect();
        names.sort();
        let mut clusters: Vec<_> = names
            .into_iter()
            .map(|name| view::cluster(name, &self.topologies[name].borrow(), Some(&sessions)))
            .collect();
        let listeners = listeners
            .iter()
            .map(|l| {
                let (routes, excluded) = view::routes(&l.policy, &l.topology.borrow());
                if let Some(c) = clusters.iter_mut().find(|c| c.name == l.cluster) {
                    view::mark_routes(c, [(l.name.clone(), routes.as_slice())]);
                }
                ListenerView {
                    name: l.name.clone(),
                    listen: l.listen.clone(),
                    cluster: l.cluster.clone(),
                    role: l.policy.role.to_string(),
                    tls: l.tls_mode.to_string(),
                    routes,
                    excluded,
                }
            })
            .collect();
        InstanceView {
            instance: self.instance.clone(),
            version: view::VERSION.into(),
            clusters,
            listeners,
        }
    }
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<AdminState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/health" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => match &state.metrics {
            Some(h) => text(StatusCode::OK, h.render()),
            None => text(
                StatusCode::NOT_FOUND,
                "no metrics recorder installed\n".into(),
            ),
        },
        "/ready" => match state.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(problems) => text(StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n"),
        },
        "/topology" => {
            json(serde_json::to_string_pretty(&state.view()).expect("a view serializes"))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            format!("not found: try {}\n", PATHS.join(", ")),
        ),
    })
}

/// The admin endpoint's socket, and the metrics it renders.
pub struct Admin {
    pub listener: TcpListener,
    pub metrics: Option<PrometheusHandle>,
}

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    info!(addr = ?listener.local_addr().ok(), "admin endpoint listening");
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, state.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
