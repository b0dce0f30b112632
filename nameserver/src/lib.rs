//! ferrumq's nameserver: a route table kept only in memory.
//!
//! Brokers register with every nameserver and repeat the registration as their heartbeat
//! ([`RouteTable::register`]); a broker not heard from for the expiry time leaves the routes
//! ([`RouteTable::expire`]). Clients may use a nameserver as their access point: it answers
//! `QueryRoute`, and the session calls a client makes there (`Telemetry`, `Heartbeat`,
//! `NotifyClientTermination`). A broker in standalone mode embeds a [`RouteTable`].

pub mod route;
pub mod service;

pub use route::RouteTable;
pub use service::NameServer;
