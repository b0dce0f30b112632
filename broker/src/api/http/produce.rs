//! Producing over HTTP, for callers without a RocketMQ SDK.
//!
//! - `POST /topics/{topic}/messages`: the request body is the message body; tag, keys,
//!   message group, delivery time and user properties come from `ferrumq-*` headers.
//! - `POST /topics/{topic}/messages/batch`: many messages as one JSON document.
//!
//! Both take the path of a gRPC SendMessage (`Broker::send`): the same checks, the same
//! durability before the reply, and a refused request stores nothing. Errors are JSON with
//! the RocketMQ code's name, a message naming the header or JSON field, and an HTTP status
//! from the code. Transactional messages need a producer that answers check-backs, which
//! HTTP has no channel for, so they are not offered here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ferrumq_protocol::message_id::new_message_id;
use ferrumq_protocol::v2::{self, Code, Resource, SystemProperties};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{ApiError, ApiResult};
use crate::message::timestamp;
use crate::service::{Broker, Sent, now_ms};

/// The largest JSON batch request.
pub(super) const MAX_BATCH_REQUEST_BYTES: usize = 64 << 20;

const MESSAGE_ID: &str = "ferrumq-message-id";
const TAG: &str = "ferrumq-tag";
const KEYS: &str = "ferrumq-keys";
const MESSAGE_GROUP: &str = "ferrumq-message-group";
const DELIVERY_TIME: &str = "ferrumq-delivery-time";
const DELAY_MS: &str = "ferrumq-delay-ms";
/// `ferrumq-property-{name}` sets user property `name`. HTTP header names are
/// case-insensitive and arrive in lowercase; the JSON form keeps a name's case.
const PROPERTY_PREFIX: &str = "ferrumq-property-";

/// A message as an HTTP caller describes it: the headers of a single send, or one entry
/// of a JSON batch.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpMessage {
    message_id: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    keys: Vec<String>,
    message_group: Option<String>,
    delivery_time: Option<DeliveryTime>,
    delay_ms: Option<u64>,
    #[serde(default)]
    properties: HashMap<String, String>,
    /// The body as UTF-8 text (JSON only).
    body: Option<String>,
    /// The body as standard base64 (JSON only).
    body_base64: Option<String>,
}

/// RFC 3339 text, or milliseconds since the epoch.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DeliveryTime {
    EpochMs(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    messages: Vec<HttpMessage>,
}

/// Where a message was stored.
#[derive(Serialize)]
struct Receipt {
    message_id: String,
    topic: String,
    /// Absent while a scheduled message waits for its time; it gets its queue and offset
    /// when it is delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_offset: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deliver_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recall_handle: Option<String>,
}

#[derive(Serialize)]
struct BatchReceipt {
    messages: Vec<Receipt>,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

/// Any path the port does not serve, as a JSON error like every other refusal.
pub(super) async fn no_such_path(uri: axum::http::Uri) -> Response {
    error_response(ApiError::new(
        Code::NotFound,
        format!("no such path {}; /openapi.json lists the paths", uri.path()),
    ))
}

/// A served path asked with another method.
pub(super) async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let body = ErrorBody {
        code: Code::BadRequest.as_str_name(),
        message: format!(
            "{} does not take {method}; /openapi.json lists the methods",
            uri.path()
        ),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// `POST /topics/{topic}/messages`.
pub(super) async fn one(
    State(broker): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    topic: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let Path(topic) = topic.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let limit = broker.config.limits.max_body_bytes;
        let body = body.map_err(|e| {
            body_error(
                e,
                Code::MessageBodyTooLarge,
                &format!("the limit is {limit} bytes"),
            )
        })?;
        let fields = from_headers(&headers)?;
        let names = delay_naming(header_field, vec![fields.delay_ms.is_some()]);
        let message = fields.into_wire(&topic, Some(body), 0, &names)?;
        let mut sent = broker
            .send(vec![message], &names, peer, &client_id(peer))
            .await?;
        let sent = sent
            .pop()
            .ok_or_else(|| ApiError::internal("the send stored nothing"))?;
        Ok::<_, ApiError>(receipt(&topic, sent))
    };
    match result.await {
        Ok(receipt) => Json(receipt).into_response(),
        Err(e) => error_response(e),
    }
}

/// `POST /topics/{topic}/messages/batch`.
pub(super) async fn batch(
    State(broker): State<Arc<Broker>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    topic: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let Path(topic) = topic.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let body = body.map_err(|e| {
            body_error(
                e,
                Code::PayloadTooLarge,
                &format!("a batch request is at most {MAX_BATCH_REQUEST_BYTES} bytes"),
            )
        })?;
        let request: BatchRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not a batch: {e}")))?;
        let delayed = request.messages.iter().map(|m| m.delay_ms.is_some());
        let names = delay_naming(json_field, delayed.collect());
        let messages = request
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_wire(&topic, None, i, &names))
            .collect::<ApiResult<Vec<_>>>()?;
        let sent = broker
            .send(messages, &names, peer, &client_id(peer))
            .await?;
        Ok::<_, ApiError>(BatchReceipt {
            messages: sent.into_iter().map(|s| receipt(&topic, s)).collect(),
        })
    };
    match result.await {
        Ok(receipt) => Json(receipt).into_response(),
        Err(e) => error_response(e),
    }
}

/// HTTP senders have no client id; their address stands in for one.
fn client_id(peer: SocketAddr) -> String {
    format!("http/{peer}")
}

fn body_error(rejection: BytesRejection, too_large: Code, limit: &str) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(too_large, format!("the request body is too large; {limit}"))
    } else {
        ApiError::bad_request(format!(
            "the request body could not be read: {}",
            rejection.body_text()
        ))
    }
}

fn receipt(topic: &str, sent: Sent) -> Receipt {
    let scheduled = sent.queue.is_none();
    Receipt {
        message_id: sent.result.message_id,
        topic: topic.to_owned(),
        queue_id: sent.queue,
        queue_offset: (!scheduled).then_some(sent.result.offset),
        deliver_at: sent.deliver_at_ms.and_then(rfc3339),
        recall_handle: (!sent.result.recall_handle.is_empty()).then_some(sent.result.recall_handle),
    }
}

fn rfc3339(ms: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// The HTTP status of a refusal: the first three digits of its RocketMQ code (40402
/// TOPIC_NOT_FOUND is 404, 41301 MESSAGE_BODY_TOO_LARGE is 413, 42900 TOO_MANY_REQUESTS is
/// 429), except that a broker unable to store now is 503.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::HaNotAvailable | Code::MasterPersistenceTimeout | Code::SlavePersistenceTimeout => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        other => u16::try_from(other as i32 / 100)
            .ok()
            .and_then(|status| StatusCode::from_u16(status).ok())
            .filter(|status| status.is_client_error() || status.is_server_error())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

fn error_response(error: ApiError) -> Response {
    let body = ErrorBody {
        code: error.code.as_str_name(),
        message: error.message,
    };
    (http_status(error.code), Json(body)).into_response()
}

/// The message the `ferrumq-*` headers describe. Other headers are ignored; an unknown
/// `ferrumq-*` header is an error, so a misspelt one is never silently dropped.
fn from_headers(headers: &HeaderMap) -> ApiResult<HttpMessage> {
    let mut message = HttpMessage::default();
    for (name, value) in headers {
        let name = name.as_str();
        if !name.starts_with("ferrumq-") {
            continue;
        }
        let text = std::str::from_utf8(value.as_bytes())
            .map_err(|_| ApiError::bad_request(format!("header {name} is not UTF-8")))?
            .to_owned();
        let once = |slot: &mut Option<String>, text: String| match slot {
            Some(_) => Err(ApiError::bad_request(format!(
                "header {name} is given twice"
            ))),
            None => {
                *slot = Some(text);
                Ok(())
            }
        };
        match name {
            MESSAGE_ID => once(&mut message.message_id, text)?,
            TAG => once(&mut message.tag, text)?,
            MESSAGE_GROUP => once(&mut message.message_group, text)?,
            KEYS => message
                .keys
                .extend(text.split(',').map(|key| key.trim().to_owned())),
            DELIVERY_TIME if message.delivery_time.is_none() => {
                message.delivery_time = Some(DeliveryTime::Text(text));
            }
            DELAY_MS if message.delay_ms.is_none() => {
                let ms = text.trim().parse().map_err(|_| {
                    ApiError::new(
                        Code::IllegalDeliveryTime,
                        format!("header {DELAY_MS} {text:?} is not a whole number of milliseconds"),
                    )
                })?;
                message.delay_ms = Some(ms);
            }
            DELIVERY_TIME | DELAY_MS => {
                return Err(ApiError::bad_request(format!(
                    "header {name} is given twice"
                )));
            }
            _ => match name.strip_prefix(PROPERTY_PREFIX) {
                Some(key) if !key.is_empty() => {
                    if message.properties.insert(key.to_owned(), text).is_some() {
                        return Err(ApiError::bad_request(format!(
                            "header {name} is given twice"
                        )));
                    }
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "header {name} is not one ferrumq reads; /openapi.json lists them"
                    )));
                }
            },
        }
    }
    Ok(message)
}

impl HttpMessage {
    /// The `apache.rocketmq.v2.Message` this describes. `body` is the request body of a
    /// single send; a batch entry carries its own.
    fn into_wire(
        self,
        topic: &str,
        body: Option<Bytes>,
        index: usize,
        names: &crate::message::FieldNames,
    ) -> ApiResult<v2::Message> {
        let body = match (body, self.body, self.body_base64) {
            (Some(bytes), None, None) => bytes,
            (None, Some(text), None) => Bytes::from(text),
            (None, None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map(Bytes::from)
                .map_err(|e| {
                    ApiError::bad_request(format!(
                        "{} is not standard base64: {e}",
                        names(index, "body_base64")
                    ))
                })?,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{} and {}: give exactly one",
                    names(index, "body"),
                    names(index, "body_base64")
                )));
            }
        };
        let now = now_ms();
        let delivery_timestamp = match (self.delivery_time, self.delay_ms) {
            (None, None) => None,
            (Some(time), None) => Some(delivery_timestamp(&time).ok_or_else(|| {
                ApiError::new(
                    Code::IllegalDeliveryTime,
                    format!(
                        "{} {time:?} is neither RFC 3339 (2026-11-22T10:00:00.250Z) nor milliseconds since the epoch",
                        names(index, "system_properties.delivery_timestamp")
                    ),
                )
            })?),
            (None, Some(delay)) => Some(timestamp(
                now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
            )),
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(format!(
                    "{} and {} are both set; give one",
                    names(index, "system_properties.delivery_timestamp"),
                    names(index, "delay_ms")
                )));
            }
        };
        Ok(v2::Message {
            topic: Some(Resource {
                name: topic.to_owned(),
                ..Resource::default()
            }),
            user_properties: self.properties,
            system_properties: Some(SystemProperties {
                tag: self.tag,
                keys: self.keys,
                message_id: self.message_id.unwrap_or_else(new_message_id),
                // Left UNSPECIFIED: the send path derives FIFO from a message group and
                // DELAY from a delivery time.
                message_type: 0,
                born_timestamp: Some(timestamp(now)),
                delivery_timestamp,
                message_group: self.message_group,
                queue_id: -1,
                ..SystemProperties::default()
            }),
            body,
        })
    }
}

fn delivery_timestamp(time: &DeliveryTime) -> Option<prost_types::Timestamp> {
    let text = match time {
        DeliveryTime::EpochMs(ms) => return Some(timestamp(*ms)),
        DeliveryTime::Text(text) => text.trim(),
    };
    if let Ok(ms) = text.parse::<i64>() {
        return Some(timestamp(ms));
    }
    let time = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    Some(prost_types::Timestamp {
        seconds: time.unix_timestamp(),
        nanos: i32::try_from(time.nanosecond()).ok()?,
    })
}

/// `names`, except that the delivery time of message `i` is named by the field that gave
/// it, the delay, when `delayed[i]`.
fn delay_naming(
    names: fn(usize, &str) -> String,
    delayed: Vec<bool>,
) -> impl Fn(usize, &str) -> String + Send + Sync {
    move |index, name| {
        let by_delay = delayed.get(index).copied().unwrap_or(false);
        if by_delay && name == "system_properties.delivery_timestamp" {
            names(index, "delay_ms")
        } else {
            names(index, name)
        }
    }
}

/// Names a field of a single send by the header (or body) that carries it.
fn header_field(_index: usize, name: &str) -> String {
    let header = match name {
        "system_properties.message_id" => MESSAGE_ID,
        "system_properties.tag" => TAG,
        "system_properties.keys" => KEYS,
        "system_properties.message_group" => MESSAGE_GROUP,
        "system_properties.delivery_timestamp" => DELIVERY_TIME,
        "delay_ms" => DELAY_MS,
        "body" | "body_base64" => return "the request body".to_owned(),
        "user_properties" => return format!("the {PROPERTY_PREFIX}* headers"),
        "system_properties.message_type" => {
            return format!(
                "the message's type (FIFO with {MESSAGE_GROUP}, DELAY with {DELIVERY_TIME} or {DELAY_MS}, else NORMAL)"
            );
        }
        "topic" => return "the path's topic".to_owned(),
        other => return other.to_owned(),
    };
    format!("header {header}")
}

/// Names a field of a batch entry by its JSON name: `messages[2].tag`.
fn json_field(index: usize, name: &str) -> String {
    let name = match name {
        "system_properties.delivery_timestamp" => "delivery_time",
        "user_properties" => "properties",
        "topic" => return "the path's topic".to_owned(),
        other => other.strip_prefix("system_properties.").unwrap_or(other),
    };
    format!("messages[{index}].{name}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_http_status_is_the_codes_first_three_digits() {
        for (code, status) in [
            (Code::BadRequest, StatusCode::BAD_REQUEST),
            (Code::IllegalMessageTag, StatusCode::BAD_REQUEST),
            (Code::TopicNotFound, StatusCode::NOT_FOUND),
            (Code::MessageBodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            (Code::TooManyRequests, StatusCode::TOO_MANY_REQUESTS),
            (Code::HaNotAvailable, StatusCode::SERVICE_UNAVAILABLE),
            (
                Code::MasterPersistenceTimeout,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (Code::InternalServerError, StatusCode::INTERNAL_SERVER_ERROR),
            // Never a success status for a refusal.
            (Code::Ok, StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            assert_eq!(http_status(code), status, "{code:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn headers_become_the_messages_fields() {
        let message = from_headers(&headers(&[
            ("content-type", "text/plain"),
            (TAG, "paid"),
            (KEYS, "order-1, order-2"),
            (KEYS, "order-3"),
            (MESSAGE_GROUP, "customer-9"),
            ("ferrumq-property-region", "eu"),
        ]))
        .unwrap();
        let wire = message
            .into_wire("orders", Some(Bytes::from_static(b"x")), 0, &header_field)
            .unwrap();
        let system = wire.system_properties.unwrap();
        assert_eq!(system.tag.as_deref(), Some("paid"));
        assert_eq!(system.keys, ["order-1", "order-2", "order-3"]);
        assert_eq!(system.message_group.as_deref(), Some("customer-9"));
        assert_eq!(system.message_id.len(), 34);
        assert_eq!(wire.user_properties["region"], "eu");
        assert_eq!(&wire.body[..], b"x");
    }

    #[test]
    fn a_misspelt_or_repeated_header_is_refused_by_name() {
        let err = from_headers(&headers(&[("ferrumq-tags", "a")])).unwrap_err();
        assert!(err.message.contains("ferrumq-tags"), "{err}");
        let err = from_headers(&headers(&[(TAG, "a"), (TAG, "b")])).unwrap_err();
        assert!(err.message.contains("ferrumq-tag is given twice"), "{err}");
        let err = from_headers(&headers(&[(DELAY_MS, "soon")])).unwrap_err();
        assert_eq!(err.code, Code::IllegalDeliveryTime);
    }

    #[test]
    fn delivery_times_are_rfc3339_or_epoch_milliseconds() {
        let at = |text: &str| delivery_timestamp(&DeliveryTime::Text(text.to_owned()));
        let expected = prost_types::Timestamp {
            seconds: 1_795_860_000,
            nanos: 250_000_000,
        };
        assert_eq!(at("2026-11-28T10:00:00.250Z"), Some(expected));
        assert_eq!(at("2026-11-28T11:00:00.250+01:00"), Some(expected));
        assert_eq!(at("1795860000250"), Some(expected));
        assert_eq!(
            delivery_timestamp(&DeliveryTime::EpochMs(1_795_860_000_250)),
            Some(expected)
        );
        assert_eq!(at("tomorrow"), None);
        assert_eq!(at("2026-11-28 10:00"), None);
    }

    #[test]
    fn fields_are_named_as_the_caller_wrote_them() {
        assert_eq!(
            header_field(0, "system_properties.tag"),
            "header ferrumq-tag"
        );
        assert_eq!(
            json_field(3, "system_properties.delivery_timestamp"),
            "messages[3].delivery_time"
        );
        assert_eq!(json_field(1, "user_properties"), "messages[1].properties");
        assert_eq!(json_field(2, "body"), "messages[2].body");
    }

    #[test]
    fn a_batch_entry_has_exactly_one_body() {
        let entry = |json: &str| serde_json::from_str::<HttpMessage>(json).unwrap();
        let err = entry(r#"{"body": "a", "body_base64": "YQ=="}"#)
            .into_wire("t", None, 4, &json_field)
            .unwrap_err();
        assert!(err.message.contains("messages[4].body"), "{err}");
        let wire = entry(r#"{"body_base64": "AAEC"}"#)
            .into_wire("t", None, 0, &json_field)
            .unwrap();
        assert_eq!(&wire.body[..], [0, 1, 2]);
        let err = entry(r#"{"body_base64": "%%"}"#)
            .into_wire("t", None, 0, &json_field)
            .unwrap_err();
        assert!(err.message.contains("messages[0].body_base64"), "{err}");
    }
}
