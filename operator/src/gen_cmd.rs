//! `prismctl gen`: the load generator.

use anyhow::{Context, bail};
use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, RecordBatch, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use chrono::NaiveDate;
use indicatif::{ProgressBar, ProgressStyle};
use optiprism_types::event::{Event, PropValue};
use optiprism_types::generator::{GenConfig, Generator};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags of `prismctl gen`.
#[derive(Debug, clap::Args)]
pub(crate) struct GenArgs {
    /// Number of events.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Days covered.
    #[arg(long, default_value_t = 90)]
    days: u32,
    /// First day (UTC).
    #[arg(long, default_value = "2024-01-01")]
    start: NaiveDate,
    /// Seed: the same seed gives the same events.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of persons [default: events / 60].
    #[arg(long)]
    persons: Option<u64>,
    /// Share of persons who start anonymous and identify in their first session (0..=1).
    #[arg(long, default_value_t = 0.0)]
    identify_share: f64,
    /// Send to this node's HTTP address, e.g. http://127.0.0.1:8088. Give several (repeated
    /// or comma-separated) to spread the batches over them in turn, as a load balancer in front
    /// of a cluster would.
    #[arg(long, conflicts_with = "out", value_delimiter = ',')]
    target: Vec<String>,
    /// Write key for `--target`.
    #[arg(long, env = "OPTIPRISM_WRITE_KEY")]
    write_key: Option<String>,
    /// Events per HTTP batch.
    #[arg(long, default_value_t = 1_000)]
    batch_size: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Send at most this many events per second (batches paced evenly), to measure latency at
    /// a given load; unlimited by default.
    #[arg(long)]
    rate: Option<f64>,
    /// Render up to this many MiB of requests before the clock starts: a run that fits is
    /// rendered whole first, so the figures are the node's speed and not the generator's; a
    /// larger one renders the rest while it sends, in that much memory.
    #[arg(long, default_value_t = 4096)]
    render_ahead_mb: u64,
    /// Write an Arrow IPC file instead of sending.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the sending report as JSON (for scripts).
    #[arg(long)]
    json: bool,
    /// Also write one CSV line per batch (`sent_unix_ms,latency_ms`: when it left and how long
    /// its acknowledgement took) to this file, to line slow batches up with what the nodes
    /// logged at that moment.
    #[arg(long)]
    latency_log: Option<PathBuf>,
}

fn config(args: &GenArgs) -> anyhow::Result<GenConfig> {
    if args.events == 0 {
        bail!("--events must be greater than 0");
    }
    if args.days == 0 {
        bail!("--days must be greater than 0");
    }
    if !(0.0..=1.0).contains(&args.identify_share) {
        bail!("--identify-share must be between 0 and 1");
    }
    Ok(GenConfig {
        seed: args.seed,
        events: args.events,
        days: args.days,
        start: args.start,
        persons: args.persons,
        identify_share: args.identify_share,
    })
}

fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} events ({{per_sec}}, eta {{eta}})"
        ))
        .expect("valid template"),
    );
    bar
}

/// Runs `prismctl gen`.
pub(crate) fn run(args: GenArgs) -> anyhow::Result<()> {
    let config = config(&args)?;
    if args.latency_log.is_some() && args.target.is_empty() {
        bail!("--latency-log records the batches sent with --target; give --target too");
    }
    match (args.target.is_empty(), &args.out) {
        (false, None) => send(&args, config, &args.target),
        (true, Some(out)) => write_file(config, out),
        _ => bail!("give either --target <http address> or --out <file.arrow>"),
    }
}

const STRING_PROPS: [&str; 7] = [
    "$session_id",
    "$browser",
    "$os",
    "country",
    "plan",
    "$current_url",
    "search_term",
];
const NUMBER_PROPS: [&str; 2] = ["price", "duration_ms"];

fn write_file(config: GenConfig, out: &PathBuf) -> anyhow::Result<()> {
    let mut fields = vec![
        Field::new("uuid", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("distinct_id", DataType::Utf8, false),
    ];
    fields.extend(
        STRING_PROPS
            .iter()
            .map(|p| Field::new(*p, DataType::Utf8, true)),
    );
    fields.extend(
        NUMBER_PROPS
            .iter()
            .map(|p| Field::new(*p, DataType::Float64, true)),
    );
    fields.push(Field::new("is_mobile", DataType::Boolean, true));
    let schema = Arc::new(Schema::new(fields));
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut writer =
        arrow::ipc::writer::FileWriter::try_new(std::io::BufWriter::new(file), &schema)?;
    let bar = progress(config.events, "writing");
    let mut events = Generator::new(config).peekable();
    while events.peek().is_some() {
        let chunk: Vec<Event> = events.by_ref().take(65_536).collect();
        let mut uuid = StringBuilder::new();
        let mut name = StringBuilder::new();
        let mut ts = TimestampMillisecondBuilder::new().with_timezone("UTC");
        let mut distinct = StringBuilder::new();
        let mut strings: Vec<StringBuilder> =
            STRING_PROPS.iter().map(|_| StringBuilder::new()).collect();
        let mut numbers: Vec<Float64Builder> =
            NUMBER_PROPS.iter().map(|_| Float64Builder::new()).collect();
        let mut mobile = BooleanBuilder::new();
        for e in &chunk {
            uuid.append_value(&e.message_id);
            name.append_value(&e.event);
            ts.append_value(e.timestamp_ms);
            distinct.append_value(&e.distinct_id);
            let get = |k: &str| {
                e.properties
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v)
            };
            for (b, key) in strings.iter_mut().zip(STRING_PROPS) {
                match get(key) {
                    Some(PropValue::Str(s)) => b.append_value(s),
                    _ => b.append_null(),
                }
            }
            for (b, key) in numbers.iter_mut().zip(NUMBER_PROPS) {
                match get(key) {
                    Some(PropValue::Num(n)) => b.append_value(*n),
                    _ => b.append_null(),
                }
            }
            match get("is_mobile") {
                Some(PropValue::Bool(v)) => mobile.append_value(*v),
                _ => mobile.append_null(),
            }
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(uuid.finish()),
            Arc::new(name.finish()),
            Arc::new(ts.finish()),
            Arc::new(distinct.finish()),
        ];
        columns.extend(strings.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.extend(numbers.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        columns.push(Arc::new(mobile.finish()));
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns)?)?;
        bar.inc(chunk.len() as u64);
    }
    writer.finish()?;
    bar.finish();
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Batch `k` of the run: its number, its events and its request body.
type Body = (usize, usize, Vec<u8>);

/// Starts rendering the run's request bodies on a thread of its own and waits until it has
/// rendered `--render-ahead-mb` of them (or all, if fewer), so that the clock starts with them
/// ready; it goes on rendering as the senders take them, never holding more than that.
fn render_ahead(
    config: GenConfig,
    args: &GenArgs,
) -> anyhow::Result<(
    tokio::sync::mpsc::Receiver<Body>,
    std::thread::JoinHandle<anyhow::Result<()>>,
)> {
    let bar = progress(config.events, "generating");
    let batch_size = args.batch_size;
    let mut events = Generator::new(config).peekable();
    let mut render = move || -> anyhow::Result<Option<(usize, Vec<u8>)>> {
        if events.peek().is_none() {
            return Ok(None);
        }
        let chunk: Vec<serde_json::Value> = events
            .by_ref()
            .take(batch_size)
            .map(|e| segment_message(&e))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({ "batch": chunk }))?;
        Ok(Some((chunk.len(), body)))
    };
    // The first body sizes the queue: the budget in bodies, and at least two per sender.
    let first = render()?.context("the generator made no events")?;
    let budget = args.render_ahead_mb.saturating_mul(1 << 20) as usize;
    let capacity = (budget / first.1.len().max(1)).max(2 * args.concurrency);
    let (queue, bodies) = tokio::sync::mpsc::channel(capacity);
    let (ready, prefilled) = std::sync::mpsc::channel::<()>();
    let renderer = std::thread::Builder::new()
        .name("gen-render".into())
        .spawn(move || -> anyhow::Result<()> {
            let mut next = Some(first);
            let mut k = 0;
            while let Some((n, body)) = next {
                if k < capacity {
                    bar.inc(n as u64);
                }
                // Fails once the senders are done with the queue (all sent, or one failed).
                if queue.blocking_send((k, n, body)).is_err() {
                    return Ok(());
                }
                k += 1;
                if k == capacity {
                    bar.finish_and_clear();
                    let _ = ready.send(());
                }
                next = render()?;
            }
            bar.finish_and_clear();
            let _ = ready.send(());
            Ok(())
        })
        .context("starting the request renderer")?;
    // Also returns when the renderer failed before filling the queue: its error comes from
    // `join` at the end, and the senders find the queue closed.
    let _ = prefilled.recv();
    Ok((bodies, renderer))
}

/// A Segment `track` message of an event.
fn segment_message(e: &Event) -> serde_json::Value {
    let properties: serde_json::Map<String, serde_json::Value> = e
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), v.to_json()))
        .collect();
    let timestamp = chrono::DateTime::from_timestamp_millis(e.timestamp_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    if e.event == "$identify" {
        let anon = e
            .properties
            .iter()
            .find(|(k, _)| k == "$anon_distinct_id")
            .map(|(_, v)| v.render());
        return serde_json::json!({
            "type": "identify", "userId": e.distinct_id, "anonymousId": anon,
            "messageId": e.message_id, "timestamp": timestamp,
        });
    }
    let mut m = serde_json::json!({
        "type": "track", "userId": e.distinct_id, "event": e.event, "properties": properties,
        "messageId": e.message_id, "timestamp": timestamp,
    });
    if !e.person_set.is_empty() {
        let traits: serde_json::Map<String, serde_json::Value> = e
            .person_set
            .iter()
            .map(|(k, v)| (k.clone(), v.to_json()))
            .collect();
        m["context"] = serde_json::json!({ "traits": traits });
    }
    m
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1_000.0
}

/// Writes `(sent, latency)` pairs as CSV in the order they were sent.
fn write_latency_log(
    path: &std::path::Path,
    started: std::time::SystemTime,
    latencies: &mut [(Duration, Duration)],
) -> anyhow::Result<()> {
    use std::io::Write;
    latencies.sort();
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating the latency log {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let epoch = started
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    writeln!(out, "sent_unix_ms,latency_ms")?;
    for (sent, latency) in latencies.iter() {
        writeln!(
            out,
            "{:.3},{:.3}",
            (epoch + *sent).as_secs_f64() * 1e3,
            latency.as_secs_f64() * 1e3
        )?;
    }
    out.flush()
        .with_context(|| format!("writing the latency log {}", path.display()))?;
    Ok(())
}

fn send(args: &GenArgs, config: GenConfig, targets: &[String]) -> anyhow::Result<()> {
    let write_key = args
        .write_key
        .clone()
        .context("--write-key (or OPTIPRISM_WRITE_KEY) is required with --target")?;
    if args.batch_size == 0 || args.concurrency == 0 {
        bail!("--batch-size and --concurrency must be greater than 0");
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of events per second");
    }
    if let Some(empty) = targets.iter().find(|t| t.trim().is_empty()) {
        bail!("--target has an empty address in it (`{empty}`)");
    }
    // Batch k goes to target k modulo their number.
    let urls: Arc<Vec<String>> = Arc::new(
        targets
            .iter()
            .map(|t| format!("{}/v1/batch", t.trim().trim_end_matches('/')))
            .collect(),
    );
    let total = config.events;
    let (bodies, renderer) = render_ahead(config, args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .build()?;
        let bar = progress(total, "sending");
        let queue = Arc::new(tokio::sync::Mutex::new(bodies));
        // With --rate, batch k leaves at k batches' worth of events after the start.
        let batch_interval = args
            .rate
            .map(|rate| Duration::from_secs_f64(args.batch_size as f64 / rate));
        let started = Instant::now();
        let started_at = std::time::SystemTime::now();
        // Shared, so the batches acknowledged before a failure still reach the latency log
        // (when it is most wanted).
        let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
        // Set by the first worker that fails: the others stop taking batches.
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for _ in 0..args.concurrency {
            let (queue, client, urls, key, bar, latencies) = (
                Arc::clone(&queue),
                client.clone(),
                Arc::clone(&urls),
                write_key.clone(),
                bar.clone(),
                Arc::clone(&latencies),
            );
            let failed = Arc::clone(&failed);
            workers.push(tokio::spawn(async move {
                let sending = async {
                    loop {
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return Ok(());
                        }
                        let Some((k, n, body)) = queue.lock().await.recv().await else {
                            break;
                        };
                        if let Some(interval) = batch_interval {
                            tokio::time::sleep_until((started + interval * k as u32).into()).await;
                        }
                        let url = &urls[k % urls.len()];
                        let sent = Instant::now();
                        let mut attempts = 0;
                        loop {
                            let response = client
                                .post(url)
                                .basic_auth(&key, Some(""))
                                .body(body.clone())
                                .send()
                                .await?;
                            let status = response.status();
                            if status.is_success() {
                                break;
                            }
                            attempts += 1;
                            if status.as_u16() != 503 || attempts > 50 {
                                anyhow::bail!(
                                    "{url} answered {status}: {}",
                                    response.text().await.unwrap_or_default()
                                );
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        let latency = sent.elapsed();
                        latencies
                            .lock()
                            .expect("no worker panics holding it")
                            .push((sent - started, latency));
                        bar.inc(n as u64);
                    }
                    Ok(())
                };
                let result: anyhow::Result<()> = sending.await;
                if result.is_err() {
                    failed.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                result
            }));
        }
        let mut failure = None;
        for w in workers {
            if let Err(e) = w.await.map_err(anyhow::Error::from).and_then(|r| r) {
                failure.get_or_insert(e);
            }
        }
        let elapsed = started.elapsed();
        bar.finish_and_clear();
        drop(queue);
        let mut latencies = std::mem::take(&mut *latencies.lock().expect("workers are done"));
        if let Some(path) = &args.latency_log {
            write_latency_log(path, started_at, &mut latencies)?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let mut latencies: Vec<Duration> = latencies.into_iter().map(|(_, l)| l).collect();
        latencies.sort();
        Ok::<_, anyhow::Error>(serde_json::json!({
            "events": total,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "rate_limit": args.rate,
            "seconds": elapsed.as_secs_f64(),
            "events_per_second": total as f64 / elapsed.as_secs_f64(),
            "latency_ms_p50": percentile(&latencies, 0.50),
            "latency_ms_p99": percentile(&latencies, 0.99),
        }))
    })?;
    // The queue is gone, so a renderer still waiting to hand over a body has stopped.
    renderer
        .join()
        .map_err(|_| anyhow::anyhow!("the request renderer stopped on a bug (it panicked)"))??;
    if args.json {
        println!("{report}");
    } else {
        println!(
            "sent {} events in {:.2} s: {:.0} events/s (batches of {}, {} in flight; ack latency p50 {:.1} ms, p99 {:.1} ms)",
            report["events"],
            report["seconds"].as_f64().unwrap_or(0.0),
            report["events_per_second"].as_f64().unwrap_or(0.0),
            args.batch_size,
            args.concurrency,
            report["latency_ms_p50"].as_f64().unwrap_or(0.0),
            report["latency_ms_p99"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
