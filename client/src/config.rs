//! Where the client connects and how patient it is; shared by producers and consumers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Connection settings. Access points are `host:port` of any nameserver or broker: the
/// client asks them for each topic's route and then talks to the brokers directly.
///
/// ```
/// use std::time::Duration;
/// use ferrumq_client::ClientConfig;
///
/// let config = ClientConfig::new("127.0.0.1:8081")
///     .with_access_point("127.0.0.1:9876")
///     .request_timeout(Duration::from_secs(5));
/// assert_eq!(config.access_points(), ["127.0.0.1:8081", "127.0.0.1:9876"]);
/// ```
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub(crate) access_points: Vec<String>,
    pub(crate) request_timeout: Duration,
    pub(crate) route_refresh: Duration,
    pub(crate) down_for: Duration,
    pub(crate) client_id: String,
}

impl ClientConfig {
    /// A configuration with one access point.
    pub fn new(access_point: impl Into<String>) -> ClientConfig {
        ClientConfig {
            access_points: vec![access_point.into()],
            request_timeout: Duration::from_secs(3),
            route_refresh: Duration::from_secs(30),
            down_for: Duration::from_secs(5),
            client_id: new_client_id(),
        }
    }

    /// Another access point. Route lookups take the access points in turn, and move on to
    /// the next when one does not answer or cannot say (anything but "no such topic").
    #[must_use]
    pub fn with_access_point(mut self, access_point: impl Into<String>) -> ClientConfig {
        self.access_points.push(access_point.into());
        self
    }

    /// How long a request may take (3 s by default); a receive's long polling comes on top.
    /// The client gives up on its own when the time is up, whether or not the broker answers,
    /// and a send is then tried again with the same message id.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> ClientConfig {
        self.request_timeout = timeout;
        self
    }

    /// How often routes are asked for again (30 s by default); a failed request asks at once.
    #[must_use]
    pub fn route_refresh_interval(mut self, interval: Duration) -> ClientConfig {
        self.route_refresh = interval;
        self
    }

    /// How long a broker that could not be reached is tried only after the others (5 s).
    #[must_use]
    pub fn unreachable_backoff(mut self, duration: Duration) -> ClientConfig {
        self.down_for = duration;
        self
    }

    pub fn access_points(&self) -> &[String] {
        &self.access_points
    }

    /// The id the broker knows this client by (the `x-mq-client-id` header): transaction
    /// check-backs and leases are tied to it.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.access_points.is_empty() {
            return Err(Error::Config(
                "no access point; give the host:port of a broker or nameserver".into(),
            ));
        }
        for point in &self.access_points {
            let port = point
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                return Err(Error::Config(format!(
                    "access point {point:?} is not host:port, such as 127.0.0.1:8081"
                )));
            }
        }
        if self.request_timeout.is_zero() {
            return Err(Error::Config("request_timeout must be above zero".into()));
        }
        Ok(())
    }
}

/// Unique per client in this process and across processes on one host: pid, a counter and
/// the start time.
fn new_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "ferrumq-rust@{}#{}#{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_points_must_be_host_and_port() {
        assert!(ClientConfig::new("127.0.0.1:8081").validate().is_ok());
        for bad in ["localhost", ":8081", "host:port", "host:70000"] {
            let error = ClientConfig::new(bad).validate().unwrap_err().to_string();
            assert!(error.contains("host:port"), "{bad}: {error}");
        }
    }

    #[test]
    fn every_client_has_its_own_id() {
        assert_ne!(
            ClientConfig::new("a:1").client_id(),
            ClientConfig::new("a:1").client_id()
        );
    }
}
