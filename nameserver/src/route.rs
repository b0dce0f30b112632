//! The route table: which brokers serve which topics, from their latest registrations.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ferrumq_protocol::cluster::BrokerRegistration;
use ferrumq_protocol::v2::{
    Address, AddressScheme, Broker, Endpoints, MessageQueue, Permission, Resource,
};

struct Entry {
    registration: BrokerRegistration,
    last_seen: Instant,
}

pub struct RouteTable {
    expiry: Duration,
    brokers: Mutex<HashMap<(String, i32), Entry>>,
}

impl RouteTable {
    pub fn new(expiry: Duration) -> RouteTable {
        RouteTable {
            expiry,
            brokers: Mutex::new(HashMap::new()),
        }
    }

    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, i32), Entry>> {
        self.brokers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds or refreshes a broker; its topic list replaces the previous one.
    pub fn register(&self, registration: BrokerRegistration) {
        let key = (registration.broker_name.clone(), registration.broker_id);
        let mut brokers = self.lock();
        if !brokers.contains_key(&key) {
            tracing::info!(broker = %key.0, id = key.1, endpoints = ?registration.endpoints, "broker registered");
        }
        brokers.insert(
            key,
            Entry {
                registration,
                last_seen: Instant::now(),
            },
        );
    }

    pub fn unregister(&self, broker_name: &str, broker_id: i32) -> bool {
        self.lock()
            .remove(&(broker_name.to_owned(), broker_id))
            .is_some()
    }

    /// Drops brokers not heard from within the expiry; returns their names.
    pub fn expire(&self, now: Instant) -> Vec<String> {
        let mut brokers = self.lock();
        let mut gone = Vec::new();
        brokers.retain(|(name, id), entry| {
            let alive = now.saturating_duration_since(entry.last_seen) < self.expiry;
            if !alive {
                tracing::warn!(broker = %name, id, "broker missed its heartbeats; dropped from routes");
                gone.push(name.clone());
            }
            alive
        });
        gone
    }

    /// Live registrations with the time since each was last heard from.
    pub fn brokers(&self) -> Vec<(BrokerRegistration, Duration)> {
        let now = Instant::now();
        let mut list: Vec<_> = self
            .lock()
            .values()
            .map(|e| {
                (
                    e.registration.clone(),
                    now.saturating_duration_since(e.last_seen),
                )
            })
            .collect();
        list.sort_by(|a, b| {
            (&a.0.broker_name, a.0.broker_id).cmp(&(&b.0.broker_name, b.0.broker_id))
        });
        list
    }

    /// The queues of `topic` on every live leader broker (id 0), all readable and writable;
    /// `None` if no broker serves the topic.
    pub fn query(&self, topic: &str) -> Option<Vec<MessageQueue>> {
        let mut queues = Vec::new();
        for (registration, _) in self.brokers() {
            if registration.broker_id != 0 {
                continue;
            }
            let Some(route) = registration.topics.iter().find(|t| t.name == topic) else {
                continue;
            };
            let endpoints = endpoints(&registration.endpoints);
            for id in 0..route.queue_count {
                queues.push(MessageQueue {
                    topic: Some(Resource {
                        resource_namespace: String::new(),
                        name: topic.to_owned(),
                    }),
                    id: i32::try_from(id).unwrap_or(i32::MAX),
                    permission: Permission::ReadWrite as i32,
                    broker: Some(Broker {
                        name: registration.broker_name.clone(),
                        id: 0,
                        endpoints: Some(endpoints.clone()),
                    }),
                    accept_message_types: route.accept_message_types.clone(),
                });
            }
        }
        (!queues.is_empty()).then_some(queues)
    }
}

/// `host:port` strings as v2 endpoints. Clients connect to the first address.
pub fn endpoints(addresses: &[String]) -> Endpoints {
    let mut scheme = AddressScheme::IPv4;
    let addresses = addresses
        .iter()
        .filter_map(|a| {
            let (host, port) = a.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.parse::<std::net::Ipv6Addr>().is_ok() {
                scheme = AddressScheme::IPv6;
            } else if host.parse::<std::net::Ipv4Addr>().is_err() {
                scheme = AddressScheme::DomainName;
            }
            Some(Address {
                host: host.to_owned(),
                port: port.parse().ok()?,
            })
        })
        .collect();
    Endpoints {
        scheme: scheme as i32,
        addresses,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrumq_protocol::cluster::TopicRoute;

    fn registration(name: &str, topics: &[(&str, u32)]) -> BrokerRegistration {
        BrokerRegistration {
            cluster: "c".into(),
            broker_name: name.into(),
            broker_id: 0,
            endpoints: vec!["127.0.0.1:8081".into()],
            topics: topics
                .iter()
                .map(|(t, n)| TopicRoute {
                    name: (*t).into(),
                    queue_count: *n,
                    accept_message_types: vec![1],
                })
                .collect(),
            auto_create_topics: false,
        }
    }

    #[test]
    fn routes_span_brokers_and_expire() {
        let table = RouteTable::new(Duration::from_millis(100));
        table.register(registration("a", &[("t", 2)]));
        table.register(registration("b", &[("t", 3), ("u", 1)]));
        assert_eq!(table.query("t").unwrap().len(), 5);
        assert_eq!(
            table.query("u").unwrap()[0].broker.as_ref().unwrap().name,
            "b"
        );
        assert!(table.query("v").is_none());
        let gone = table.expire(Instant::now() + Duration::from_millis(150));
        assert_eq!(gone.len(), 2);
        assert!(table.query("t").is_none());
    }

    #[test]
    fn a_registration_replaces_the_topic_list() {
        let table = RouteTable::new(Duration::from_secs(10));
        table.register(registration("a", &[("t", 2)]));
        table.register(registration("a", &[("u", 2)]));
        assert!(table.query("t").is_none());
        assert!(table.query("u").is_some());
    }
}
