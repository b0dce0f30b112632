//! Counters exported in Prometheus's text format at `/metrics`, under RocketMQ's metric names
//! where RocketMQ has one.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_delivered: AtomicU64,
    messages_acked: AtomicU64,
    dead_lettered: AtomicU64,
    send_errors: AtomicU64,
    repeated_sends: AtomicU64,
    pub transactions_committed: AtomicU64,
    pub transactions_rolled_back: AtomicU64,
    pub transactions_discarded: AtomicU64,
    pub transaction_checks: AtomicU64,
    pub timers_delivered: AtomicU64,
    pub timers_recalled: AtomicU64,
}

impl Metrics {
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_received(&self, messages: u64, bytes: u64) {
        self.messages_in.fetch_add(messages, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_send_error(&self) {
        self.send_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_repeated_sends(&self, n: u64) {
        self.repeated_sends.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_delivered(&self, n: u64) {
        self.messages_delivered.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_acked(&self, n: u64) {
        self.messages_acked.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_dead_lettered(&self, n: u64) {
        self.dead_lettered.fetch_add(n, Ordering::Relaxed);
    }

    /// The text exposition; `gauges` adds values read at scrape time.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let counters = [
            (
                "rocketmq_messages_in_total",
                "Messages stored from producers.",
                &self.messages_in,
            ),
            (
                "rocketmq_throughput_in_total",
                "Body bytes stored from producers.",
                &self.bytes_in,
            ),
            (
                "rocketmq_messages_out_total",
                "Messages delivered to consumers (redeliveries included).",
                &self.messages_delivered,
            ),
            (
                "ferrumq_messages_acked_total",
                "Messages acked by consumers.",
                &self.messages_acked,
            ),
            (
                "rocketmq_send_to_dlq_messages_total",
                "Messages moved to a dead-letter topic.",
                &self.dead_lettered,
            ),
            (
                "ferrumq_send_errors_total",
                "SendMessage requests refused.",
                &self.send_errors,
            ),
            (
                "ferrumq_send_repeats_total",
                "Messages sent again with an id stored within the duplicate window: answered as the first send was, not stored again.",
                &self.repeated_sends,
            ),
            (
                "rocketmq_commit_messages_total",
                "Transactions committed.",
                &self.transactions_committed,
            ),
            (
                "rocketmq_rollback_messages_total",
                "Transactions rolled back.",
                &self.transactions_rolled_back,
            ),
            (
                "ferrumq_transactions_discarded_total",
                "Transactions discarded after the maximum number of checks.",
                &self.transactions_discarded,
            ),
            (
                "ferrumq_transaction_checks_total",
                "Check-backs sent to producers.",
                &self.transaction_checks,
            ),
            (
                "ferrumq_timer_messages_delivered_total",
                "Scheduled messages put into their topic when due.",
                &self.timers_delivered,
            ),
            (
                "ferrumq_timer_messages_recalled_total",
                "Scheduled messages recalled before they were due.",
                &self.timers_recalled,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}
