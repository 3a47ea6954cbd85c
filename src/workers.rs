//! The relay's threads: one current-thread runtime per thread, and which of them a new client
//! goes to. A session and its timers stay on the thread it was given, so most of a
//! transaction's wake-ups stay on one core; pools still lend connections across threads (a
//! lease prefers one opened on the borrower's thread).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where sessions are spawned: the runtimes to spread them over, or (with none) wherever the
/// accept loop runs.
#[derive(Clone, Default)]
pub struct Workers {
    threads: Arc<Vec<Worker>>,
}

struct Worker {
    handle: Handle,
    thread: std::thread::ThreadId,
    sessions: Arc<AtomicUsize>,
}

/// The threads `Workers::start` started: dropping this stops and joins them (their sessions
/// must have ended by then; any left are dropped).
pub struct Threads {
    stop: CancellationToken,
    joins: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Sessions spread over the caller's runtime (the binary's is a current-thread one; the
    /// accept loop, discovery and the admin console share it, so it takes a new client only
    /// when it has strictly fewer) and `n - 1` more threads, each with a current-thread
    /// runtime of its own. If one cannot be started, those already started are stopped.
    pub fn start(n: usize) -> std::io::Result<(Workers, Threads)> {
        let mut started = Threads {
            stop: CancellationToken::new(),
            joins: Vec::new(),
        };
        let mut threads = vec![Worker::new(Handle::current(), std::thread::current().id())];
        for i in 1..n.max(1) {
            // The runtime is built and dropped on its own thread: dropping one inside the
            // caller's runtime (a thread that failed to start) would panic.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let stop = started.stop.clone();
            let join = std::thread::Builder::new()
                .name(format!("patroxy-relay-{i}"))
                .spawn(move || {
                    let built = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let runtime = match built {
                        Ok(r) => r,
                        Err(e) => return drop(tx.send(Err(e))),
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(stop.cancelled());
                    runtime.shutdown_background();
                })?;
            let thread = join.thread().id();
            started.joins.push(join);
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("a relay thread ended as it started"))??;
            threads.push(Worker::new(handle, thread));
        }
        let workers = Workers {
            threads: Arc::new(threads),
        };
        Ok((workers, started))
    }

    /// Runs `session` for `stream` in `tracker`, on the thread with the fewest sessions (ties
    /// go to the last started). The socket moves to that thread's reactor; if it cannot, the
    /// client is dropped (logged).
    pub fn spawn<F, S>(&self, tracker: &TaskTracker, stream: TcpStream, session: S)
    where
        S: FnOnce(TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        // `min_by_key` keeps the first of equals: walking backwards, that is the last.
        let fewest = self
            .threads
            .iter()
            .rev()
            .min_by_key(|w| w.sessions.load(Relaxed));
        let Some(worker) = fewest else {
            tracker.spawn(session(stream));
            return;
        };
        if worker.thread == std::thread::current().id() {
            let counted = Counted::new(&worker.sessions);
            tracker.spawn(async move {
                let _counted = counted;
                session(stream).await
            });
            return;
        }
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand an accepted connection to a relay thread");
                return;
            }
        };
        let counted = Counted::new(&worker.sessions);
        tracker.spawn_on(
            async move {
                let _counted = counted;
                match TcpStream::from_std(std) {
                    Ok(stream) => session(stream).await,
                    Err(e) => tracing::warn!(error = %e, "cannot register an accepted connection"),
                }
            },
            &worker.handle,
        );
    }

    /// How many threads sessions are spread over (0: they run where they are accepted).
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

impl Worker {
    fn new(handle: Handle, thread: std::thread::ThreadId) -> Worker {
        Worker {
            handle,
            thread,
            sessions: Arc::default(),
        }
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.stop.cancel();
        for join in self.joins.drain(..) {
            let _ = join.join();
        }
    }
}

/// A session counted on its thread for as long as it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(n: &Arc<AtomicUsize>) -> Counted {
        n.fetch_add(1, Relaxed);
        Counted(n.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_go_to_the_thread_with_the_fewest_and_each_stays_there() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (workers, threads) = Workers::start(2).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let tracker = TaskTracker::new();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let hold = CancellationToken::new();
            let mut clients = Vec::new();
            for _ in 0..4 {
                clients.push(TcpStream::connect(addr).await.unwrap());
                let (stream, _) = listener.accept().await.unwrap();
                let (tx, hold) = (tx.clone(), hold.clone());
                workers.spawn(&tracker, stream, move |mut s| async move {
                    let before = std::thread::current().id();
                    tokio::io::AsyncWriteExt::write_all(&mut s, b"x")
                        .await
                        .unwrap();
                    hold.cancelled().await;
                    tx.send((before, std::thread::current().id())).unwrap();
                });
                // Each one is counted before the next is placed.
                let mut b = [0u8];
                tokio::io::AsyncReadExt::read_exact(clients.last_mut().unwrap(), &mut b)
                    .await
                    .unwrap();
            }
            hold.cancel();
            tracker.close();
            tracker.wait().await;
            let mut seen = std::collections::HashMap::new();
            while let Ok((before, after)) = rx.try_recv() {
                assert_eq!(before, after, "a session moved threads");
                *seen.entry(before).or_insert(0) += 1;
            }
            assert_eq!(seen.len(), 2, "{seen:?}");
            assert!(seen.values().all(|&n| n == 2), "{seen:?}");
            drop(threads);
        });
    }
}
