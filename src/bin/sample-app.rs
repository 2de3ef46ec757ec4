//! `sample-app`: the instrumented web application of the demo and the tests, a
//! stand-in for the post's Go sample. It serves:
//!
//! - `GET /work`: answers after a simulated latency (exponential, mean
//!   `--mean-latency-ms`, or `?ms=N`);
//! - `GET /metrics`: `http_requests_total` and the `request_duration_milliseconds`
//!   histogram (buckets 500, 1000, 2500, 5000), in the Prometheus text format;
//! - optionally, on `--exporter-listen`, an ECS-exporter-like `/metrics` with
//!   `ecs_cpu_percent` and `ecs_memory_bytes` of this process.
//!
//! `--load-rps N` starts a built-in load generator calling its own `/work`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::Parser;

const BUCKETS_MS: [f64; 4] = [500.0, 1000.0, 2500.0, 5000.0];
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Parser)]
#[command(
    name = "sample-app",
    version,
    about = "Instrumented sample workload for shard-sd"
)]
struct Args {
    /// Address of the application (`/work`, `/metrics`).
    #[arg(long, env = "APP_LISTEN_ADDR", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Address of the ECS-exporter-like endpoint; off when unset.
    #[arg(long, env = "EXPORTER_LISTEN_ADDR")]
    exporter_listen: Option<SocketAddr>,
    /// Requests per second the built-in load generator sends to `/work` (0 = off).
    #[arg(long, env = "LOAD_RPS", default_value_t = 0.0)]
    load_rps: f64,
    /// Mean simulated latency of `/work`, in milliseconds.
    #[arg(long, env = "MEAN_LATENCY_MS", default_value_t = 300.0)]
    mean_latency_ms: f64,
    /// Container name in the exporter's labels.
    #[arg(long, env = "EXPORTER_CONTAINER_NAME", default_value = "webapp")]
    container_name: String,
}

#[derive(Default)]
struct Metrics {
    /// (method, path, code) -> count
    requests: BTreeMap<(&'static str, &'static str, u16), u64>,
    bucket_counts: [u64; BUCKETS_MS.len()],
    sum_ms: f64,
    count: u64,
}

impl Metrics {
    fn observe(&mut self, path: &'static str, code: u16, ms: f64) {
        *self.requests.entry(("GET", path, code)).or_default() += 1;
        for (i, le) in BUCKETS_MS.iter().enumerate() {
            if ms <= *le {
                self.bucket_counts[i] += 1;
            }
        }
        self.sum_ms += ms;
        self.count += 1;
    }

    fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP http_requests_total Count of HTTP requests processed.\n");
        out.push_str("# TYPE http_requests_total counter\n");
        for ((method, path, code), n) in &self.requests {
            let _ = writeln!(
                out,
                "http_requests_total{{code=\"{code}\",method=\"{method}\",path=\"{path}\"}} {n}"
            );
        }
        out.push_str("# HELP request_duration_milliseconds Time taken to process a request.\n");
        out.push_str("# TYPE request_duration_milliseconds histogram\n");
        for (le, n) in BUCKETS_MS.iter().zip(self.bucket_counts) {
            let _ = writeln!(
                out,
                "request_duration_milliseconds_bucket{{le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "request_duration_milliseconds_bucket{{le=\"+Inf\"}} {}",
            self.count
        );
        let _ = writeln!(out, "request_duration_milliseconds_sum {}", self.sum_ms);
        let _ = writeln!(out, "request_duration_milliseconds_count {}", self.count);
        out
    }
}

struct App {
    metrics: Mutex<Metrics>,
    mean_latency_ms: f64,
}

#[derive(serde::Deserialize)]
struct WorkParams {
    ms: Option<u64>,
}

async fn work(State(app): State<Arc<App>>, Query(params): Query<WorkParams>) -> impl IntoResponse {
    let started = Instant::now();
    let delay = params.ms.map_or_else(
        // Exponential latency: -mean * ln(U), U in (0, 1].
        || -app.mean_latency_ms * (1.0 - fastrand::f64()).ln(),
        |ms| ms as f64,
    );
    tokio::time::sleep(Duration::from_secs_f64(delay.clamp(0.0, 60_000.0) / 1000.0)).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    lock(&app.metrics).observe("/work", 200, ms);
    "done\n"
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        lock(&app.metrics).render(),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// CPU and memory of this process, read from /proc, like the ECS exporter
/// reports a container's.
struct Exporter {
    container: String,
    last: Mutex<Option<(Instant, f64)>>,
}

fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn exporter_metrics(State(exp): State<Arc<Exporter>>) -> impl IntoResponse {
    let now = Instant::now();
    let cpu = process_cpu_seconds().unwrap_or(0.0);
    let percent = {
        let mut last = lock(&exp.last);
        let percent = match *last {
            Some((at, prev)) if now > at => {
                100.0 * (cpu - prev) / now.duration_since(at).as_secs_f64()
            }
            _ => 0.0,
        };
        *last = Some((now, cpu));
        percent.max(0.0)
    };
    let c = &exp.container;
    let mut out = String::new();
    out.push_str("# HELP ecs_cpu_percent CPU usage of the container, in percent of one vCPU.\n");
    out.push_str("# TYPE ecs_cpu_percent gauge\n");
    let _ = writeln!(out, "ecs_cpu_percent{{container=\"{c}\"}} {percent}");
    out.push_str("# HELP ecs_memory_bytes Memory usage of the container.\n");
    out.push_str("# TYPE ecs_memory_bytes gauge\n");
    let _ = writeln!(
        out,
        "ecs_memory_bytes{{container=\"{c}\"}} {}",
        process_rss_bytes().unwrap_or(0)
    );
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], out)
}

/// Sends `rps` requests per second to `url`, each in its own task so slow answers
/// do not lower the rate.
async fn generate_load(url: String, rps: f64) {
    let client = reqwest::Client::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rps));
    loop {
        ticker.tick().await;
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let _ = client
                .get(url)
                .timeout(Duration::from_secs(70))
                .send()
                .await;
        });
    }
}

async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.load_rps >= 0.0 && args.load_rps.is_finite(),
        "--load-rps must be >= 0"
    );
    anyhow::ensure!(
        args.mean_latency_ms >= 0.0,
        "--mean-latency-ms must be >= 0"
    );
    let app = Arc::new(App {
        metrics: Mutex::new(Metrics::default()),
        mean_latency_ms: args.mean_latency_ms,
    });
    let router = Router::new()
        .route("/work", get(work))
        .route("/metrics", get(metrics))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(serve(listener, router));
    if let Some(addr) = args.exporter_listen {
        let exporter = Arc::new(Exporter {
            container: args.container_name.clone(),
            last: Mutex::new(None),
        });
        let router = Router::new()
            .route("/metrics", get(exporter_metrics))
            .with_state(exporter);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        servers.spawn(serve(listener, router));
    }
    if args.load_rps > 0.0 {
        tokio::spawn(generate_load(
            format!("http://{}/work", args.listen),
            args.load_rps,
        ));
    }
    eprintln!(
        "sample-app listening on {} (exporter: {:?})",
        args.listen, args.exporter_listen
    );
    while let Some(done) = servers.join_next().await {
        done??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut m = Metrics::default();
        for ms in [100.0, 700.0, 3000.0, 9000.0] {
            m.observe("/work", 200, ms);
        }
        let text = m.render();
        assert!(
            text.contains("request_duration_milliseconds_bucket{le=\"500\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("request_duration_milliseconds_bucket{le=\"1000\"} 2\n"));
        assert!(text.contains("request_duration_milliseconds_bucket{le=\"5000\"} 3\n"));
        assert!(text.contains("request_duration_milliseconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("request_duration_milliseconds_count 4\n"));
        assert!(
            text.contains("http_requests_total{code=\"200\",method=\"GET\",path=\"/work\"} 4\n")
        );
    }
}
