//! How results are shown: a table for people, or JSON for scripts (`--output json`). Every
//! command builds one serializable value and says how its table looks.

use std::collections::BTreeMap;

use base64::Engine as _;
use ferrumq_protocol::v2;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
}

/// Rows under a header, columns padded to their widest cell.
pub(crate) struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let padded: Vec<String> = cells
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            padded.join("  ").trim_end().to_owned()
        };
        let mut out = line(&mut self.header.iter().copied());
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(&mut row.iter().map(String::as_str)));
        }
        out
    }
}

/// `key: value` lines.
pub(crate) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(key, value)| format!("{:<width$} {value}", format!("{key}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints `value` as JSON, or the text `table` builds from it.
pub(crate) fn emit<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> String) {
    let text = match format {
        Format::Json => serde_json::to_string_pretty(value).unwrap_or_default(),
        Format::Table => table(value),
    };
    #[allow(clippy::print_stdout, reason = "a CLI's results go to stdout")]
    {
        println!("{text}");
    }
}

/// RFC 3339, or empty for 0 (unset).
pub(crate) fn time_text(ms: i64) -> String {
    if ms == 0 {
        return String::new();
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// Parses an RFC 3339 time into ms since the epoch.
pub(crate) fn parse_time(text: &str) -> Result<i64, String> {
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| format!("{text:?} is not an RFC 3339 time such as 2026-11-22T10:00:00Z"))?;
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).map_err(|_| "out of range".to_owned())
}

fn timestamp_ms(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos / 1_000_000))
    })
}

/// A message as the CLI shows it.
#[derive(Debug, Serialize)]
pub(crate) struct MessageOut {
    pub(crate) message_id: String,
    pub(crate) topic: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tag: Option<String>,
    pub(crate) keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message_group: Option<String>,
    pub(crate) queue_id: i32,
    pub(crate) queue_offset: i64,
    pub(crate) born_at: String,
    pub(crate) stored_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) deliver_at: String,
    pub(crate) properties: BTreeMap<String, String>,
    pub(crate) body_bytes: usize,
    /// The body as text when it is UTF-8, cut at 200 characters.
    pub(crate) body_preview: String,
    pub body_base64: String,
}

impl MessageOut {
    pub(crate) fn from_wire(message: &v2::Message) -> MessageOut {
        let system = message.system_properties.clone().unwrap_or_default();
        let preview = match std::str::from_utf8(&message.body) {
            Ok(text) if text.chars().count() > 200 => {
                format!("{}…", text.chars().take(200).collect::<String>())
            }
            Ok(text) => text.to_owned(),
            Err(_) => format!("<{} bytes of binary>", message.body.len()),
        };
        MessageOut {
            message_id: system.message_id.clone(),
            topic: message
                .topic
                .as_ref()
                .map(|t| t.name.clone())
                .unwrap_or_default(),
            tag: system.tag.clone(),
            keys: system.keys.clone(),
            message_group: system.message_group.clone(),
            queue_id: system.queue_id,
            queue_offset: system.queue_offset.unwrap_or(0),
            born_at: time_text(timestamp_ms(system.born_timestamp.as_ref())),
            stored_at: time_text(timestamp_ms(system.store_timestamp.as_ref())),
            deliver_at: time_text(timestamp_ms(system.delivery_timestamp.as_ref())),
            properties: message.user_properties.clone().into_iter().collect(),
            body_bytes: message.body.len(),
            body_preview: preview,
            body_base64: base64::engine::general_purpose::STANDARD.encode(&message.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let mut table = Table::new(&["NAME", "QUEUES"]);
        table.row(vec!["orders".to_owned(), "8".to_owned()]);
        table.row(vec!["a".to_owned(), "16".to_owned()]);
        assert_eq!(table.render(), "NAME    QUEUES\norders  8\na       16");
    }

    #[test]
    fn times_are_rfc3339_both_ways() {
        let ms = parse_time("2026-11-22T10:00:00.250Z");
        assert_eq!(ms, Ok(1_795_341_600_250));
        assert_eq!(time_text(1_795_341_600_250), "2026-11-22T10:00:00.25Z");
        assert!(parse_time("yesterday").is_err());
        assert_eq!(time_text(0), "");
    }
}
