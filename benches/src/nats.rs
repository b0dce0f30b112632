//! Acked publishes to NATS JetStream, the peer the produce figures are compared with.
//!
//! Speaks the NATS text protocol over one TCP connection: `PUB subject reply size`, and
//! JetStream's ack arrives as a message on the reply subject. C publishes are in flight at
//! once, each awaited by its ack, as `produce` keeps C sends in flight. The stream is created
//! fresh with file storage (`nats-server -js`; the server's default flushes to disk every
//! two minutes, like ferrumq's `flush = "async"` within its interval).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::network::{latency_fields, new_histogram, runtime};
use crate::report::{Format, Report};

#[derive(Args, Debug, Clone)]
pub(crate) struct NatsArgs {
    /// The NATS server's address.
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub(crate) server: String,
    #[arg(long, default_value_t = 1024)]
    pub(crate) size: usize,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) count: u64,
    /// Publishes in flight.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
}

const STREAM: &str = "FERRUMQBENCH";
const SUBJECT: &str = "ferrumq.bench";
const INBOX: &str = "_INBOX.ferrumq";

pub(crate) fn run(args: &NatsArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let stream = TcpStream::connect(&args.server)
            .await
            .with_context(|| format!("connecting to nats-server at {}", args.server))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::with_capacity(1 << 20, read);
        let mut writer = BufWriter::with_capacity(1 << 20, write);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        if !line.starts_with("INFO") {
            bail!("not a NATS server: {line:?}");
        }
        writer
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false}\r\n")
            .await?;
        writer
            .write_all(format!("SUB {INBOX}.* 1\r\n").as_bytes())
            .await?;
        // A fresh stream each run: delete (an error if absent is fine), then create.
        let config = format!(
            "{{\"name\":\"{STREAM}\",\"subjects\":[\"{SUBJECT}\"],\"storage\":\"file\",\"retention\":\"limits\"}}"
        );
        for (api, body) in [
            (format!("$JS.API.STREAM.DELETE.{STREAM}"), String::new()),
            (format!("$JS.API.STREAM.CREATE.{STREAM}"), config),
        ] {
            publish(&mut writer, &api, "setup", body.as_bytes()).await?;
            writer.flush().await?;
            let reply = read_message(&mut reader).await?;
            if api.contains("CREATE") && reply.1.contains("\"error\"") {
                bail!("creating the stream failed: {}", reply.1);
            }
        }

        let count = args.count;
        let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
        let in_flight = Arc::new(Semaphore::new(args.concurrency));
        let epoch = Instant::now();
        let acks = {
            let (sent_at, in_flight) = (sent_at.clone(), in_flight.clone());
            tokio::spawn(async move {
                let mut histogram = new_histogram()?;
                for _ in 0..count {
                    let (subject, payload) = read_message(&mut reader).await?;
                    if payload.contains("\"error\"") {
                        bail!("publish failed: {payload}");
                    }
                    let i: usize = subject.rsplit('.').next().unwrap_or("").parse()?;
                    let sent = sent_at[i].load(Ordering::Relaxed);
                    let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
                    histogram.record(now.saturating_sub(sent).max(1))?;
                    in_flight.add_permits(1);
                }
                Ok::<Histogram<u64>, anyhow::Error>(histogram)
            })
        };
        let body = vec![b'x'; args.size];
        let start = Instant::now();
        for i in 0..count {
            if in_flight.available_permits() == 0 {
                writer.flush().await?;
            }
            in_flight.acquire().await?.forget();
            let now = u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
            sent_at[usize::try_from(i)?].store(now, Ordering::Relaxed);
            publish(&mut writer, SUBJECT, &i.to_string(), &body).await?;
        }
        writer.flush().await?;
        let histogram = acks.await??;
        let seconds = start.elapsed().as_secs_f64();
        let mut report = Report::default();
        report
            .add("mode", "nats-publish")
            .add("messages", count)
            .add("concurrency", args.concurrency as u64)
            .add("seconds", seconds)
            .add("messages_per_sec", count as f64 / seconds)
            .add("mb_per_sec", (count as f64 * args.size as f64) / seconds / 1e6);
        latency_fields(&mut report, &histogram);
        report.print(args.format);
        Ok(())
    })
}

async fn publish(
    writer: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    subject: &str,
    reply: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    writer
        .write_all(format!("PUB {subject} {INBOX}.{reply} {}\r\n", body.len()).as_bytes())
        .await?;
    writer.write_all(body).await?;
    writer.write_all(b"\r\n").await?;
    Ok(())
}

/// The next `MSG subject sid size` frame's subject and payload, skipping PING, +OK and
/// the like.
async fn read_message(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> anyhow::Result<(String, String)> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            bail!("nats-server closed the connection");
        }
        if line.starts_with("-ERR") {
            bail!("nats-server: {}", line.trim_end());
        }
        if let Some(header) = line.strip_prefix("MSG ") {
            let fields: Vec<&str> = header.split_whitespace().collect();
            let (Some(subject), Some(size)) = (fields.first(), fields.last()) else {
                bail!("a MSG line without subject or size: {line:?}");
            };
            let mut payload = vec![0; size.parse::<usize>()? + 2];
            reader.read_exact(&mut payload).await?;
            payload.truncate(payload.len() - 2);
            return Ok((
                subject.to_string(),
                String::from_utf8_lossy(&payload).into_owned(),
            ));
        }
    }
}
