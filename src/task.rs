//! Background tasks that must not die silently: each runs under a supervisor that logs and
//! counts a panic, then starts the task again after a pause. A task that returns has
//! finished its work (usually at shutdown) and is not restarted.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::backoff::Backoff;

/// Runs the task `make` builds until it returns, building and starting it again after each
/// panic, until `stop`.
pub async fn supervise<F, Fut>(name: String, stop: CancellationToken, mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    crate::metrics::task_started(&name);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let why = match tokio::spawn(make()).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => panic_message(e.into_panic()),
            // Aborted: the runtime is shutting down.
            Err(_) => return,
        };
        crate::metrics::task_panic(&name);
        let pause = backoff.next_pause();
        error!(task = %name, panic = %why, restart_in = ?pause, "a background task panicked; restarting it");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |s| (*s).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_panicking_task_is_restarted_until_it_finishes() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let stop = CancellationToken::new();
        let supervised = supervise("test".into(), stop, move || {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), supervised)
            .await
            .expect("the supervisor returns once the task finishes");
        assert_eq!(runs.load(Ordering::SeqCst), 3, "two panics, two restarts");
    }

    #[tokio::test]
    async fn stop_ends_the_restarts() {
        let stop = CancellationToken::new();
        stop.cancel();
        let supervised = supervise("test".into(), stop, || async { panic!("always") });
        tokio::time::timeout(Duration::from_secs(10), supervised)
            .await
            .expect("stopped");
    }
}
