//! `scale-harness`: a test tool, not part of shard-sd; `scripts/scale.sh` builds
//! and runs it. It starts `synthetic-aws` with a generated account, moto for the
//! lease table, and R shard-sd replicas over N slots on loopback, then measures
//! what an operator of a large deployment wants to know, and prints a report (one
//! JSON object with `--json`):
//!
//! - `targets`, `services`; `first_cycle_s` (start to the first complete
//!   publication: the leader has discovered every target and the shards cover
//!   them); `unchanged_cycle_s` and `unchanged_cycle_requests` (a cycle in which
//!   nothing changed, from the leader's status);
//! - over a steady window of `--duration`: `requests_per_s` by operation and
//!   `throttled_requests` (counted by the synthetic endpoint), `leader_cpu_pct`;
//!   `leader_rss_mib` and `follower_rss_mib` (max);
//! - `registration_to_shard_s` (p50, max): from a registration at the synthetic
//!   endpoint to the target appearing in some replica's `/prometheus-targets`;
//! - `peer_bytes_per_change` received per follower for one registration, from
//!   `shard_sd_peer_bytes_received_total`; `peer_full_copy_bytes`, what a whole
//!   copy of the assignment weighs on the peer wire; `churn_bytes_per_follower`
//!   for `--churn-burst` instances registered and deregistered at once (1% of the
//!   targets by default), and `churn_bytes_vs_encoded`, that over what the changed
//!   targets weigh in a whole copy;
//! - `new_leader_publish_s`: from SIGKILL of the leader to a survivor leading a
//!   newer term with its assignment published, and `new_leader_survivors_changed`,
//!   the survivors whose served shard changed meanwhile (a target moved);
//! - `http_sd_p99_ms` (and p50) of the largest shard with 50 concurrent clients
//!   that ask as Prometheus's http_sd does (no `Accept-Encoding`: the JSON), each
//!   asking every `--client-pause`
//!   plus up to half of it, their first requests spread over one pause (100 ms
//!   by default: about 400 requests a second in all, far above 50 collectors'
//!   30 s refresh); the same with clients that accept gzip
//!   (`http_sd_gzip_*`); and without gzip with each client asking again at once
//!   (`http_sd_saturated_*`), which measures the server's throughput rather than
//!   a collector's wait. Resident sizes are the larger of before and after
//!   these loads (a replica keeps the JSON it served until its list changes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "scale-harness",
    about = "Test tool: measures shard-sd at scale against synthetic-aws"
)]
struct Args {
    /// Cloud Map services in all.
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Instances per service.
    #[arg(long, default_value_t = 100)]
    instances: usize,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Shard slots; default the number of replicas.
    #[arg(long)]
    slots: Option<usize>,
    /// Registrations plus deregistrations per second during the steady window.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Length of the steady window.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// CONFIG_RELOAD_FREQUENCY of the replicas.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    refresh: Duration,
    /// AWS_MAX_RPS of the replicas (Cloud Map calls per second in all).
    #[arg(long)]
    max_rps: Option<f64>,
    /// Instances registered and deregistered at once for `churn_bytes_per_follower`
    /// (default: 1% of the targets).
    #[arg(long)]
    churn_burst: Option<usize>,
    /// Skip SIGKILLing the leader at the end.
    #[arg(long)]
    no_kill: bool,
    /// Registrations timed for `registration_to_shard_s`.
    #[arg(long, default_value_t = 5)]
    registrations: usize,
    /// Seconds of 50-client load on the largest shard.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    load: Duration,
    /// More flags for synthetic-aws, as one string (e.g. "--discover-rps 200
    /// --discover-burst 400 --latency-ms 20" to make Cloud Map throttle and lag).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    aws_flags: String,
    /// Pause of each of the 50 clients between its requests (plus up to half of it).
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    client_pause: Duration,
    /// Directory of the shard-sd and synthetic-aws binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// moto's server, for the lease table.
    #[arg(long, default_value = ".venv/bin/moto_server")]
    moto: PathBuf,
    /// Where child process logs go.
    #[arg(long, default_value = "target/scale-logs")]
    logs: PathBuf,
    /// Give up if the first complete publication takes longer.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    first_cycle_limit: Duration,
    #[arg(long)]
    json: bool,
}

/// A child process killed when dropped.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn spawn(logs: &std::path::Path, name: &str, cmd: &mut Command) -> Result<Proc> {
    std::fs::create_dir_all(logs)?;
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
    Ok(Proc { child })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds and resident bytes of a process, from /proc.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu, rss_kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

struct Replica {
    proc: Proc,
    addr: String,
}

struct Harness {
    args: Args,
    client: reqwest::Client,
    synthetic: String,
    replicas: Vec<Replica>,
    /// Each replica's peer address.
    peers: Vec<String>,
    _moto: Proc,
    _aws: Proc,
}

async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("gave up after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Harness {
    async fn get_json(&self, url: &str) -> Option<Value> {
        self.client.get(url).send().await.ok()?.json().await.ok()
    }

    async fn status(&self, r: &Replica) -> Option<Value> {
        self.get_json(&format!("http://{}/v1/status", r.addr)).await
    }

    async fn synthetic_stats(&self) -> Result<Value> {
        self.get_json(&format!("{}/synthetic/stats", self.synthetic))
            .await
            .context("synthetic-aws stats")
    }

    /// A metric's value on a replica (the sum over its label sets).
    async fn metric(&self, r: &Replica, name: &str) -> f64 {
        let text = async {
            self.client
                .get(format!("http://{}/metrics", r.addr))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()
        }
        .await
        .unwrap_or_default();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Index of the leader.
    async fn leader(&self) -> Option<usize> {
        for (i, r) in self.replicas.iter().enumerate() {
            if self.status(r).await.is_some_and(|s| s["role"] == "leader") {
                return Some(i);
            }
        }
        None
    }

    async fn start(args: Args) -> Result<Harness> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()?;
        let slots = args.slots.unwrap_or(args.replicas);
        let namespaces = args.services.div_ceil(1000).max(1);
        let per_namespace = args.services.div_ceil(namespaces);
        let aws_port = free_port()?;
        let aws = spawn(
            &args.logs,
            "synthetic-aws",
            Command::new(args.bin_dir.join("synthetic-aws"))
                .args([
                    "--listen".into(),
                    format!("127.0.0.1:{aws_port}"),
                    "--namespaces".into(),
                    namespaces.to_string(),
                    "--services".into(),
                    per_namespace.to_string(),
                    "--instances".into(),
                    args.instances.to_string(),
                    "--churn-per-s".into(),
                    args.churn.to_string(),
                ])
                .args(args.aws_flags.split_whitespace()),
        )?;
        let synthetic = format!("http://127.0.0.1:{aws_port}");
        let moto_port = free_port()?;
        let moto = spawn(
            &args.logs,
            "moto",
            Command::new(&args.moto).args(["-H", "127.0.0.1", "-p", &moto_port.to_string()]),
        )?;
        let mut harness = Harness {
            args,
            client,
            synthetic,
            replicas: Vec::new(),
            peers: Vec::new(),
            _moto: moto,
            _aws: aws,
        };
        wait_until(
            "synthetic-aws and moto",
            Duration::from_secs(30),
            || async {
                let a = harness.synthetic_stats().await.ok()?;
                let m = harness
                    .client
                    .get(format!("http://127.0.0.1:{moto_port}/moto-api/"))
                    .send()
                    .await
                    .ok()?;
                m.status().is_success().then_some(a)
            },
        )
        .await?;
        for i in 0..harness.args.replicas {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let peer = format!("127.0.0.1:{}", free_port()?);
            let mut cmd = Command::new(harness.args.bin_dir.join("shard-sd"));
            cmd.env_clear()
                .env("AWS_ACCESS_KEY_ID", "test")
                .env("AWS_SECRET_ACCESS_KEY", "test")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_EC2_METADATA_DISABLED", "true")
                .env("AWS_ENDPOINT_URL", &harness.synthetic)
                .env(
                    "AWS_ENDPOINT_URL_DYNAMODB",
                    format!("http://127.0.0.1:{moto_port}"),
                )
                .env("LEASE_TABLE", "leases")
                .env("CREATE_TABLE", "true")
                .env("SHARD_COUNT", slots.to_string())
                .env("REPLICA_ID", format!("r{i}"))
                .env("LISTEN_ADDR", &addr)
                .env("PEER_LISTEN_ADDR", &peer)
                .env("ADVERTISE_ADDR", &peer)
                .env("PEER_TOKEN", "scale")
                .env("DISCOVERY_NAMESPACES_PARAMETER_NAME", "namespaces")
                .env(
                    "CONFIG_RELOAD_FREQUENCY",
                    format!("{}ms", harness.args.refresh.as_millis()),
                )
                // Start-up handoffs (slots joining one by one) end quickly.
                .env("HANDOFF_GRACE", "1s")
                .env("LOG_FORMAT", "json")
                .env("RUST_LOG", "info");
            if let Some(rps) = harness.args.max_rps {
                cmd.env("AWS_MAX_RPS", rps.to_string());
            }
            let proc = spawn(&harness.args.logs, &format!("shard-sd-r{i}"), &mut cmd)?;
            harness.replicas.push(Replica { proc, addr });
            harness.peers.push(peer);
        }
        Ok(harness)
    }

    /// The union of what the replicas serve covers `targets` and every replica is ready.
    async fn published(&self, targets: usize) -> Option<()> {
        let mut served = 0usize;
        for r in &self.replicas {
            let s = self.status(r).await?;
            if s["ready"] != true {
                return None;
            }
            served += s["shard_targets"].as_u64().unwrap_or(0) as usize;
        }
        let leader = self.leader().await?;
        let discovered = self
            .metric(&self.replicas[leader], "shard_sd_targets_discovered")
            .await as usize;
        // Every target served, and the start-up handoffs over (nothing served twice).
        let settled = served as f64 <= targets as f64 * 1.01 + 5.0;
        (discovered >= targets && served >= targets && settled).then_some(())
    }

    /// Waits for the leader's next cycle after `after` (its `last_discovery.time`).
    async fn next_cycle(&self, leader: usize, after: &Value) -> Result<Value> {
        let limit = self.args.refresh * 4 + Duration::from_secs(600);
        wait_until("the next discovery cycle", limit, || async {
            let s = self.status(&self.replicas[leader]).await?;
            let last = s["last_discovery"].clone();
            (last["time"] != after["time"] && last.is_object()).then_some(last)
        })
        .await
    }

    /// From a registration to the target in some replica's http_sd, in seconds.
    async fn registration_to_shard(&self) -> Result<f64> {
        let stats = self.synthetic_stats().await?;
        let services = stats["services"].as_u64().unwrap_or(1).max(1);
        let service = fastrand::u64(0..services);
        let started = Instant::now();
        let target = self
            .client
            .post(format!(
                "{}/synthetic/register?service={service}",
                self.synthetic
            ))
            .send()
            .await?
            .text()
            .await?;
        let needle = format!("\"{target}\"");
        let mut etags: Vec<Option<String>> = vec![None; self.replicas.len()];
        let limit = self.args.refresh * 3 + Duration::from_secs(300);
        loop {
            for (i, r) in self.replicas.iter().enumerate() {
                // As Prometheus asks (no Accept-Encoding), and, to spare the
                // harness, again in full only when the ETag moved.
                let mut req = self
                    .client
                    .get(format!("http://{}/prometheus-targets", r.addr))
                    .header("accept", "application/json");
                if let Some(etag) = &etags[i] {
                    req = req.header("if-none-match", etag);
                }
                let Ok(resp) = req.send().await else { continue };
                if resp.status() != 200 {
                    continue;
                }
                etags[i] = resp
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = resp.bytes().await.unwrap_or_default();
                if body.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    return Ok(started.elapsed().as_secs_f64());
                }
            }
            if started.elapsed() > limit {
                bail!("{target} did not reach a shard within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What a follower would receive for a whole copy of the assignment, in bytes:
    /// the replication stream from the start, or (a leader of an earlier release)
    /// the encoded snapshot.
    async fn full_copy_bytes(&self, leader: usize) -> Option<u64> {
        let addr = &self.peers[leader];
        let changes = self
            .client
            .get(format!("http://{addr}/v1/changes?after_term=0&after=0"))
            .bearer_auth("scale")
            .send()
            .await
            .ok()?;
        let resp = match changes.status() {
            reqwest::StatusCode::NOT_FOUND => self
                .client
                .get(format!("http://{addr}/v1/snapshot?after_term=0&after=0"))
                .header("accept", "application/vnd.shard-sd.snapshot")
                .bearer_auth("scale")
                .send()
                .await
                .ok()?,
            _ => changes,
        };
        resp.status().is_success().then_some(())?;
        Some(resp.bytes().await.ok()?.len() as u64)
    }

    /// Bytes each follower received since `before` (per follower, in order).
    async fn peer_bytes_since(&self, followers: &[usize], before: &[f64]) -> Vec<f64> {
        let now = self.peer_bytes(followers).await;
        now.iter().zip(before).map(|(n, b)| n - b).collect()
    }

    async fn peer_bytes(&self, followers: &[usize]) -> Vec<f64> {
        let mut out = Vec::new();
        for i in followers {
            out.push(
                self.metric(&self.replicas[*i], "shard_sd_peer_bytes_received_total")
                    .await,
            );
        }
        out
    }

    /// Each replica's (slot, ETag) as served.
    async fn served(&self, which: &[usize]) -> Vec<(Value, Value)> {
        let mut out = Vec::new();
        for i in which {
            let s = self.status(&self.replicas[*i]).await.unwrap_or_default();
            out.push((s["slot"].clone(), s["etag"].clone()));
        }
        out
    }

    /// SIGKILLs the leader; returns the seconds until a survivor leads in a newer
    /// term and has published its assignment, and how many survivors then serve
    /// something else than before (a target moved) 3 s later.
    async fn kill_leader(&mut self, leader: usize) -> Result<(f64, usize, u64)> {
        let old_term = self
            .status(&self.replicas[leader])
            .await
            .unwrap_or_default()["term"]
            .as_u64()
            .unwrap_or(0);
        let survivors: Vec<usize> = (0..self.replicas.len()).filter(|i| *i != leader).collect();
        let before = self.served(&survivors).await;
        let killed = Instant::now();
        let _ = self.replicas[leader].proc.child.kill();
        let _ = self.replicas[leader].proc.child.wait();
        let limit = Duration::from_secs(120);
        let term = wait_until("a new leader's publication", limit, || async {
            for i in &survivors {
                let s = self.status(&self.replicas[*i]).await?;
                let term = s["term"].as_u64().unwrap_or(0);
                if s["role"] != "leader" || term <= old_term {
                    continue;
                }
                let doc = self
                    .client
                    .get(format!("http://{}/v1/assignment", self.peers[*i]))
                    .bearer_auth("scale")
                    .send()
                    .await
                    .ok()?
                    .json::<Value>()
                    .await
                    .ok()?;
                if doc["generation"].is_u64() && doc["term"].as_u64() == Some(term) {
                    return Some(term);
                }
            }
            None
        })
        .await?;
        let publish_s = killed.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = self.served(&survivors).await;
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        Ok((publish_s, moved, term))
    }

    /// p50 and p99 latency, in ms, of `GET /prometheus-targets` on `addr` with 50
    /// concurrent clients (asking for gzip when `gzip`, else as Prometheus does), each asking again at once (`pause` zero:
    /// the server saturated) or every `pause`; and the body size and request count.
    async fn http_sd_latency(
        &self,
        addr: &str,
        pause: Duration,
        gzip: bool,
    ) -> (f64, f64, u64, u64) {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            let url = format!("http://{addr}/prometheus-targets");
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut bytes = 0u64;
                // Collectors' refreshes start at different times: the clients'
                // first requests are spread over one pause, not sent at once.
                tokio::time::sleep(pause * i / 50).await;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    // Prometheus's http_sd sends no Accept-Encoding.
                    let mut req = client.get(&url).header("accept", "application/json");
                    if gzip {
                        req = req.header("accept-encoding", "gzip");
                    }
                    let Ok(resp) = req.send().await else {
                        continue;
                    };
                    let Ok(body) = resp.bytes().await else {
                        continue;
                    };
                    samples.push(t.elapsed().as_secs_f64() * 1000.0);
                    bytes = body.len() as u64;
                    if !pause.is_zero() {
                        // Spread the clients: each waits its pause, jittered.
                        let jitter = fastrand::u64(0..pause.as_millis() as u64 / 2 + 1);
                        tokio::time::sleep(pause + Duration::from_millis(jitter)).await;
                    }
                }
                (samples, bytes)
            }));
        }
        tokio::time::sleep(self.args.load).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut bytes = 0;
        for t in tasks {
            if let Ok((s, b)) = t.await {
                all.extend(s);
                bytes = b;
            }
        }
        all.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        (pct(0.50), pct(0.99), bytes, all.len() as u64)
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

async fn run(args: Args) -> Result<Value> {
    let json_out = args.json;
    let mut h = Harness::start(args).await?;
    let started = Instant::now();
    let stats = h.synthetic_stats().await?;
    let targets = stats["targets"].as_u64().unwrap_or(0) as usize;
    let services = stats["services"].as_u64().unwrap_or(0);
    if !json_out {
        eprintln!(
            "scale: {targets} targets in {services} services, {} replicas",
            h.replicas.len()
        );
    }
    wait_until(
        "the first complete publication",
        h.args.first_cycle_limit,
        || h.published(targets),
    )
    .await?;
    let first_cycle_s = started.elapsed().as_secs_f64();
    let leader = h.leader().await.context("no leader")?;
    if !json_out {
        eprintln!("scale: first complete publication after {first_cycle_s:.1}s");
    }

    // An unchanged cycle (no churn yet): its duration and AWS requests.
    let first = h.status(&h.replicas[leader]).await.unwrap_or_default()["last_discovery"].clone();
    let unchanged = h.next_cycle(leader, &first).await?;

    // The steady window.
    h.client
        .post(format!("{}/synthetic/reset", h.synthetic))
        .send()
        .await?;
    let pids: Vec<u32> = h.replicas.iter().map(|r| r.proc.pid()).collect();
    let cpu_before = cpu_and_rss(pids[leader]).0;
    let window = Instant::now();
    tokio::time::sleep(h.args.duration).await;
    let elapsed = window.elapsed().as_secs_f64();
    let leader_cpu_pct = (cpu_and_rss(pids[leader]).0 - cpu_before) / elapsed * 100.0;
    let steady = h.synthetic_stats().await?;
    let requests_per_s: BTreeMap<String, f64> = steady["requests"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), round(v.as_f64().unwrap_or(0.0) / elapsed, 2)))
                .collect()
        })
        .unwrap_or_default();
    let throttled: u64 = steady["throttled"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    // The leader's resident size, and the largest of the followers'.
    let resident = || {
        let followers = pids
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, p)| cpu_and_rss(*p).1)
            .max();
        (cpu_and_rss(pids[leader]).1, followers)
    };
    let (leader_rss, follower_rss) = resident();

    // Registrations, and what followers receive for one.
    let followers: Vec<usize> = (0..h.replicas.len()).filter(|i| *i != leader).collect();
    let peer_before = h.peer_bytes(&followers).await;
    let mut times = Vec::new();
    for n in 0..h.args.registrations.max(1) {
        times.push(h.registration_to_shard().await?);
        if n == 0 {
            // Let every follower's long-polls settle on the change.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let peer_bytes: Vec<f64> = h
        .peer_bytes_since(&followers, &peer_before)
        .await
        .iter()
        .map(|b| b / times.len() as f64)
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let p50 = times[times.len() / 2];
    let max = times.last().copied().unwrap_or(f64::NAN);

    // The largest shard under load.
    let mut largest = (0usize, 0u64);
    for (i, r) in h.replicas.iter().enumerate() {
        let n = h.status(r).await.unwrap_or_default()["shard_targets"]
            .as_u64()
            .unwrap_or(0);
        if n >= largest.1 {
            largest = (i, n);
        }
    }
    let addr = h.replicas[largest.0].addr.clone();
    let (lat_p50, lat_p99, json_bytes, requests) =
        h.http_sd_latency(&addr, h.args.client_pause, false).await;
    let (gz_p50, gz_p99, gzip_bytes, gz_requests) =
        h.http_sd_latency(&addr, h.args.client_pause, true).await;
    let (sat_p50, sat_p99, _, sat_requests) = h.http_sd_latency(&addr, Duration::ZERO, false).await;
    // Resident sizes again, now that every replica serves its JSON to clients
    // without gzip: the larger of the two is reported.
    let (leader_after, followers_after) = resident();
    let (leader_before_load, followers_before_load) = (leader_rss, follower_rss);
    let leader_rss = leader_rss.max(leader_after);
    let follower_rss = follower_rss.max(followers_after);

    // A burst of changes (1% of the targets by default): what each follower
    // receives for it, against what those targets weigh in a whole copy.
    let full_copy = h.full_copy_bytes(leader).await.unwrap_or(0);
    let burst = h.args.churn_burst.unwrap_or(targets / 100).max(1);
    let before = h.peer_bytes(&followers).await;
    let changed: usize = h
        .client
        .post(format!("{}/synthetic/churn?count={burst}", h.synthetic))
        .send()
        .await?
        .text()
        .await?
        .trim()
        .parse()
        .unwrap_or(0);
    // Two whole cycles see every changed service; then the followers settle.
    let last = h.status(&h.replicas[leader]).await.unwrap_or_default()["last_discovery"].clone();
    let next = h.next_cycle(leader, &last).await?;
    h.next_cycle(leader, &next).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let churn_bytes = h.peer_bytes_since(&followers, &before).await;
    let per_target = full_copy as f64 / targets.max(1) as f64;
    let churn_ratio: Vec<f64> = churn_bytes
        .iter()
        .map(|b| round(b / (changed as f64 * per_target), 2))
        .collect();

    let kill = match h.args.no_kill {
        true => None,
        false => Some(h.kill_leader(leader).await?),
    };

    // In two parts: one `json!` of every figure exceeds the macro's recursion limit.
    let mut report = json!({
        "targets": targets,
        "services": services,
        "replicas": h.replicas.len(),
        "slots": h.args.slots.unwrap_or(h.args.replicas),
        "refresh_s": h.args.refresh.as_secs_f64(),
        "max_rps": h.args.max_rps,
        "aws_flags": h.args.aws_flags,
        "churn_per_s": h.args.churn,
        "first_cycle_s": round(first_cycle_s, 2),
        "unchanged_cycle_s": round(unchanged["duration_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0, 2),
        "unchanged_cycle_requests": unchanged["aws_requests"],
        "requests_per_s": requests_per_s,
        "throttled_requests": throttled,
        "leader_rss_mib": mib(leader_rss),
        "leader_rss_before_http_sd_load_mib": mib(leader_before_load),
        "follower_rss_before_http_sd_load_mib": followers_before_load.map(mib),
        "largest_shard_on_leader": largest.0 == leader,
        "leader_cpu_pct": round(leader_cpu_pct, 2),
        "follower_rss_mib": follower_rss.map(mib),
        "registration_to_shard_s": {"p50": round(p50, 2), "max": round(max, 2), "n": times.len()},
    });
    let peers_and_serving = json!({
        "peer_bytes_per_change": peer_bytes.iter().map(|b| b.round()).collect::<Vec<_>>(),
        "peer_full_copy_bytes": full_copy,
        "churn_burst": burst,
        "churn_targets_changed": changed,
        "churn_bytes_per_follower": churn_bytes.iter().map(|b| b.round()).collect::<Vec<_>>(),
        "churn_bytes_vs_encoded": churn_ratio,
        "new_leader_publish_s": kill.map(|k| round(k.0, 2)),
        "new_leader_survivors_changed": kill.map(|k| k.1),
        "new_leader_term": kill.map(|k| k.2),
        "largest_shard_targets": largest.1,
        "http_sd_p50_ms": round(lat_p50, 2),
        "http_sd_p99_ms": round(lat_p99, 2),
        "http_sd_requests": requests,
        "http_sd_client_pause_ms": h.args.client_pause.as_millis() as u64,
        "http_sd_saturated_p50_ms": round(sat_p50, 2),
        "http_sd_saturated_p99_ms": round(sat_p99, 2),
        "http_sd_saturated_requests_per_s": round(sat_requests as f64 / h.args.load.as_secs_f64(), 0),
        "http_sd_json_bytes": json_bytes,
        "http_sd_gzip_p50_ms": round(gz_p50, 2),
        "http_sd_gzip_p99_ms": round(gz_p99, 2),
        "http_sd_gzip_requests": gz_requests,
        "http_sd_gzip_bytes": gzip_bytes,

    });
    if let (Some(all), Value::Object(more)) = (report.as_object_mut(), peers_and_serving) {
        all.extend(more);
    }
    Ok(report)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let json_out = args.json;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(args))?;
    if json_out {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
