//! The gRPC front: thin handlers that read a request, call the [`Broker`](crate::service::Broker)
//! and shape the reply the clients expect.

pub mod admin;
pub mod messaging;

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// The caller's deadline from the `grpc-timeout` header (`<digits><unit>`).
pub fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let value: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(value.saturating_mul(3600)),
        "M" => Duration::from_secs(value.saturating_mul(60)),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", "3000m".parse().unwrap());
        let d = deadline(&m)
            .unwrap()
            .saturating_duration_since(Instant::now());
        assert!(d > Duration::from_millis(2900) && d <= Duration::from_secs(3));
        m.insert("grpc-timeout", "x".parse().unwrap());
        assert!(deadline(&m).is_none());
    }
}
