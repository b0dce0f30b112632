//! What can go wrong, each with what to do about it.

use std::time::Duration;

use ferrumq_protocol::v2::Code;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder was given something unusable.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A message the broker would refuse; nothing was sent.
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// No connection could be made, or it broke.
    #[error(
        "cannot reach {endpoint} ({reason}); check that a ferrumq broker or nameserver listens there"
    )]
    Unreachable { endpoint: String, reason: String },

    /// The broker answered with a status other than OK.
    #[error("{endpoint} refused: {} {message}{}", code_name(*.code), hint(*.code))]
    Broker {
        endpoint: String,
        /// The RocketMQ `Code` as a number (see [`Error::code`]).
        code: i32,
        message: String,
    },

    /// No access point knows a broker for the topic.
    #[error(
        "no broker serves topic {topic:?} ({reason}); create it with `ferrumq-admin topic create {topic}` or check the access points"
    )]
    NoRoute { topic: String, reason: String },

    /// The broker did not answer in time.
    #[error(
        "{endpoint} did not answer within {timeout:?}; raise the request timeout or check the broker's load"
    )]
    Timeout { endpoint: String, timeout: Duration },

    /// The producer or consumer was shut down.
    #[error("the {0} is shut down")]
    Shutdown(&'static str),
}

impl Error {
    /// The RocketMQ code of a broker refusal.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Broker { code, .. } => Code::try_from(*code).ok(),
            _ => None,
        }
    }

    /// Whether trying again (maybe at another broker) may succeed: lost connections,
    /// timeouts, throttling and brokers that cannot store right now.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unreachable { .. } | Error::Timeout { .. } => true,
            Error::Broker { code, .. } => matches!(code / 100, 429 | 500 | 504),
            _ => false,
        }
    }

    /// Whether the endpoint itself is gone, so others should be tried first for a while.
    pub(crate) fn is_endpoint_down(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Broker { code, .. } => *code == Code::HaNotAvailable as i32,
            _ => false,
        }
    }

    pub(crate) fn from_rpc(endpoint: &str, timeout: Duration, status: &tonic::Status) -> Error {
        match status.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Error::Timeout {
                endpoint: endpoint.to_owned(),
                timeout,
            },
            tonic::Code::Unavailable | tonic::Code::Unknown => Error::Unreachable {
                endpoint: endpoint.to_owned(),
                reason: status.message().to_owned(),
            },
            code => Error::Broker {
                endpoint: endpoint.to_owned(),
                code: match code {
                    tonic::Code::ResourceExhausted => Code::TooManyRequests,
                    tonic::Code::Unauthenticated => Code::Unauthorized,
                    tonic::Code::PermissionDenied => Code::Forbidden,
                    tonic::Code::Unimplemented => Code::NotImplemented,
                    tonic::Code::Internal | tonic::Code::DataLoss => Code::InternalError,
                    _ => Code::BadRequest,
                } as i32,
                message: format!("gRPC {code:?}: {}", status.message()),
            },
        }
    }

    /// `Ok` for an OK status (or none at all, from an old server), else the refusal.
    pub(crate) fn check(
        endpoint: &str,
        status: Option<&ferrumq_protocol::v2::Status>,
    ) -> Result<()> {
        match status {
            Some(s) if s.code != Code::Ok as i32 => Err(Error::Broker {
                endpoint: endpoint.to_owned(),
                code: s.code,
                message: s.message.clone(),
            }),
            _ => Ok(()),
        }
    }
}

fn code_name(code: i32) -> String {
    Code::try_from(code).map_or_else(|_| format!("code {code}"), |c| c.as_str_name().to_owned())
}

fn hint(code: i32) -> &'static str {
    match Code::try_from(code) {
        Ok(Code::TopicNotFound) => {
            "; create the topic with `ferrumq-admin topic create`, or enable auto-creation"
        }
        Ok(Code::ConsumerGroupNotFound) => {
            "; create the group with `ferrumq-admin group create`, or enable auto-creation"
        }
        Ok(Code::MessagePropertyConflictWithType) => {
            "; the topic does not accept this message type (see `ferrumq-admin topic describe`)"
        }
        Ok(Code::InvalidReceiptHandle) => {
            "; the lease ended or was renewed elsewhere, so the message will be delivered again"
        }
        Ok(Code::TooManyRequests) => "; the broker is throttling: send more slowly or retry later",
        Ok(Code::MessageBodyTooLarge) => "; split the body or raise the broker's max_body_bytes",
        Ok(Code::IllegalInvisibleTime) => "; choose an invisible duration the broker allows",
        Ok(Code::HaNotAvailable) => "; the broker cannot store now, another broker will be tried",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_its_code_and_says_what_to_do() {
        let e = Error::Broker {
            endpoint: "127.0.0.1:8081".into(),
            code: Code::TopicNotFound as i32,
            message: "topic \"x\" does not exist".into(),
        };
        let text = e.to_string();
        assert!(text.contains("TOPIC_NOT_FOUND"), "{text}");
        assert!(text.contains("ferrumq-admin topic create"), "{text}");
        assert_eq!(e.code(), Some(Code::TopicNotFound));
        assert!(!e.is_retryable());
    }

    #[test]
    fn throttling_and_unavailable_brokers_are_retryable() {
        let refusal = |code: Code| Error::Broker {
            endpoint: String::new(),
            code: code as i32,
            message: String::new(),
        };
        assert!(refusal(Code::TooManyRequests).is_retryable());
        assert!(refusal(Code::HaNotAvailable).is_retryable());
        assert!(refusal(Code::MasterPersistenceTimeout).is_retryable());
        assert!(!refusal(Code::BadRequest).is_retryable());
        assert!(refusal(Code::HaNotAvailable).is_endpoint_down());
        let unknown = refusal(Code::Ok).to_string();
        assert!(unknown.contains("OK"), "{unknown}");
    }
}
