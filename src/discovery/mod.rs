//! Discovery: Patroni's view of the cluster, read from etcd (`watcher.rs`) and published as
//! `Arc<Topology>` snapshots through a `watch` channel. Sessions depend only on that channel,
//! so tests can drive them by writing Patroni-shaped keys into a real etcd.

pub mod contact;
pub mod patroni;
pub mod topology;
pub mod watcher;

pub use contact::EtcdContact;
pub use topology::Topology;
pub use watcher::EtcdWatcher;
