//! A gate: a TCP forwarder on a free loopback port that a test can cut (every connection
//! through it closed, new ones refused) and heal, to separate patroxy from a server (etcd,
//! PostgreSQL) while the server itself runs on; or hold, so that new connections are taken
//! but reach the server only when it lets them go (connections already through it go on).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    /// While true, new connections wait before they are forwarded.
    held: tokio::sync::watch::Sender<bool>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    task: JoinHandle<()>,
}

impl Gate {
    /// Forwards a free port to `target` on 127.0.0.1.
    pub async fn start(target: u16) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (held, holding) = tokio::sync::watch::channel(false);
        let (o, l) = (open.clone(), links.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let mut holding = holding.clone();
                let link = tokio::spawn(async move {
                    let _ = holding.wait_for(|held| !held).await;
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                l.lock().unwrap().push(link.abort_handle());
            }
        });
        Gate {
            port,
            open,
            held,
            links,
            task,
        }
    }

    /// Closes every connection through the gate and refuses new ones until `heal`.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// New connections wait at the gate until `release`.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    pub fn release(&self) {
        self.held.send_replace(false);
    }

    pub fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
