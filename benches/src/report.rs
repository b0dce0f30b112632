//! Printing results as a human table or as one JSON object.

use clap::ValueEnum;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub(crate) enum Format {
    #[default]
    Text,
    Json,
}

/// Ordered name → value pairs, printed as aligned lines or as JSON.
#[derive(Default)]
pub(crate) struct Report {
    fields: Vec<(&'static str, Value)>,
}

impl Report {
    pub(crate) fn add(&mut self, name: &'static str, value: impl Into<Value>) -> &mut Report {
        self.fields.push((name, value.into()));
        self
    }

    pub(crate) fn print(&self, format: Format) {
        match format {
            Format::Json => {
                let map: Map<String, Value> = self
                    .fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect();
                println!("{}", Value::Object(map));
            }
            Format::Text => {
                for (name, value) in &self.fields {
                    match value {
                        Value::Number(n) if n.is_f64() => {
                            println!("{name:<24} {:.2}", n.as_f64().unwrap_or_default());
                        }
                        Value::String(s) => println!("{name:<24} {s}"),
                        other => println!("{name:<24} {other}"),
                    }
                }
            }
        }
    }
}

/// Parses sizes such as `1024`, `64KiB`, `1GiB`.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("not a size: {text}"))?;
    let factor = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other} (use B, KiB, MiB or GiB)"
            ));
        }
    };
    Ok(number * factor)
}
