//! The admin HTTP endpoint: `/health` (the process answers), `/metrics` (Prometheus), and
//! `/ready` (every cluster's watch is healthy and its primary is known), for Kubernetes
//! probes, load balancers and Prometheus, and `/topology` (the JSON view of `view.rs`).
//! Bounded for whoever can reach it: a few connections at once (`admin.max_connections`),
//! each closed if its headers are slow (`admin.header_timeout`) or it lives too long, and
//! with `admin.token` the two that tell about the cluster need it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

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

use crate::backoff::Backoff;
use crate::state::Running;

/// The paths the admin endpoint answers.
pub const PATHS: [&str; 4] = ["/health", "/ready", "/metrics", "/topology"];

/// What the admin endpoint reports on: the running state, and the metrics it renders.
pub struct AdminState {
    pub running: Running,
    /// Renders `/metrics`; `None` when no recorder is installed.
    pub metrics: Option<PrometheusHandle>,
}

/// Whether `req` may see `path`: `/metrics` and `/topology` need the token, when there is one.
fn permitted(req: &Request<Incoming>, path: &str, token: Option<&str>) -> bool {
    let Some(token) = token.filter(|_| matches!(path, "/metrics" | "/topology")) else {
        return true;
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    crate::auth::same(given.as_bytes(), token.as_bytes())
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
    let token = state.running.config.borrow().admin.token.clone();
    if !permitted(&req, req.uri().path(), token.as_ref().map(|t| t.expose())) {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            "a bearer token is needed\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return Ok(r);
    }
    Ok(match req.uri().path() {
        "/health" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => match &state.metrics {
            Some(h) => {
                for (cluster, dcs, up, silent) in state.running.dcs_links() {
                    if dcs == "etcd" {
                        crate::metrics::etcd_silence(&cluster, silent);
                    }
                    crate::metrics::dcs_link(&cluster, dcs, up, silent);
                }
                text(StatusCode::OK, h.render())
            }
            None => text(
                StatusCode::NOT_FOUND,
                "no metrics recorder installed\n".into(),
            ),
        },
        "/ready" => match state.running.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(problems) => text(StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n"),
        },
        "/topology" => {
            json(serde_json::to_string_pretty(&state.running.view()).expect("a view serializes"))
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
pub async fn serve(
    listener: Arc<TcpListener>,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    info!(addr = ?listener.local_addr().ok(), "admin endpoint listening");
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_secs(1));
    let limits = state.running.config.borrow().admin.clone();
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refused = crate::throttle::Every::new(Duration::from_secs(10));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    backoff.reset();
                    s
                }
                Err(e) => {
                    let pause = backoff.next_pause();
                    warn!(error = %e, ?pause, "admin accept failed");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
        };
        let Ok(place) = open.clone().try_acquire_owned() else {
            if let Some(n) = refused.due(std::time::Instant::now()) {
                warn!(connections = n, max = limits.max_connections, "admin endpoint full: connections closed at once (this line comes at most every 10 s)");
            }
            drop(stream);
            continue;
        };
        let state = state.clone();
        let (header_timeout, lifetime) = (limits.header_timeout, limits.connection_lifetime);
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, state.clone()));
            let served = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(lifetime, served).await;
            drop(place);
        });
    }
}
