//! Discovery: Patroni's view of each cluster, read from its DCS and published as
//! `Arc<Topology>` snapshots through a `watch` channel. The sources: etcd, watched
//! (`watcher.rs`); ZooKeeper, watched (`zookeeper.rs`); Patroni's REST API, polled
//! (`rest.rs`), for Kubernetes, Consul and Raft. Sessions depend only on the channel, never
//! on which source fed it, so tests can drive them by writing Patroni-shaped keys into a
//! real etcd.

pub mod cluster_api;
pub mod contact;
pub mod http_get;
pub mod patroni;
pub mod publish;
pub mod rest;
pub mod topology;
pub mod watcher;
pub mod zookeeper;

pub use contact::DcsContact;
pub use topology::Topology;
pub use watcher::EtcdWatcher;
