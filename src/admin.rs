//! The admin HTTP endpoint: `/health` (the process answers), `/metrics` (Prometheus), and
//! `/ready` (every cluster's watch is healthy and its primary is known), for Kubernetes
//! probes, load balancers and Prometheus, and `/topology` (the JSON view of `view.rs`).

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
            Some(h) => {
                for (cluster, silent) in state.running.etcd_silence() {
                    crate::metrics::etcd_silence(&cluster, silent);
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
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, state.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
