//! How the broker says no: an [`ApiError`] carries the RocketMQ `Code` the clients understand
//! and a message naming the field at fault.

use ferrumq_protocol::v2::{Code, Status};

/// A refusal to show a client. Only codes the official 5.0.0 clients know are used: an
/// unknown code makes the Rust client panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::BadRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::InternalServerError, message)
    }

    pub fn status(&self) -> Status {
        Status::new(self.code, self.message.clone())
    }
}

impl From<ferrumq_storage::Error> for ApiError {
    fn from(err: ferrumq_storage::Error) -> ApiError {
        match err {
            ferrumq_storage::Error::DiskFull { .. } => ApiError::new(
                Code::TooManyRequests,
                format!("storage refuses writes: {err}"),
            ),
            ferrumq_storage::Error::Poisoned { .. } | ferrumq_storage::Error::Closed => {
                ApiError::new(
                    Code::HaNotAvailable,
                    format!("the broker cannot store messages now: {err}"),
                )
            }
            other => ApiError::internal(format!("storage: {other}")),
        }
    }
}

/// A result whose error is shown to the client.
pub type ApiResult<T> = Result<T, ApiError>;

/// Failures of the broker as a whole (start-up, files), not of one request.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Storage(#[from] ferrumq_storage::Error),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Api(#[from] ApiError),
}
