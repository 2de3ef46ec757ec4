//! Test harness: real protocol peers on loopback. A moto server per test (DynamoDB,
//! SSM and Cloud Map through the real SDK), an AWS-behaviour proxy in front of it
//! (paging, result caps, request counting, fault injection), the real `shard-sd`
//! and `sample-app` binaries as child processes, and a real Prometheus.
#![allow(dead_code)]

pub mod backend;
pub mod cloudmap;
pub mod cluster;
pub mod events;
pub mod proxy;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGION: &str = "us-east-1";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A directory for child process logs, kept after the test for post-mortems.
pub fn log_dir() -> PathBuf {
    let dir = repo_root().join("target/test-logs");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `url` answers with a success status.
pub async fn wait_http_ok(what: &str, url: &str, timeout: Duration) {
    let client = http();
    wait_for(what, timeout, || {
        let req = client.get(url).send();
        async move { req.await.ok().filter(|r| r.status().is_success()).map(drop) }
    })
    .await;
}

/// Result vector of an instant query to the Prometheus-compatible API at `base`.
pub async fn instant_query(base: &str, promql: &str) -> Vec<serde_json::Value> {
    let body: serde_json::Value = http()
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", promql)])
        .send()
        .await
        .expect("query request")
        .json()
        .await
        .expect("query json");
    assert_eq!(body["status"], "success", "{promql}: {body}");
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn find_tool(env: &str, venv_name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    let venv = repo_root().join(".venv/bin").join(venv_name);
    if venv.exists() {
        return venv;
    }
    PathBuf::from(venv_name)
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let log = log_dir().join(format!("{name}-{}.log", std::process::id()));
        let file = std::fs::File::create(&log).expect("create log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a pid we own; no memory is involved.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly.
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A moto server on a free loopback port.
pub struct Moto {
    pub proc: Proc,
    pub endpoint: String,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = free_port();
        let proc = Proc::spawn(
            &format!("moto-{port}"),
            Command::new(find_tool("MOTO_SERVER", "moto_server")).args([
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ]),
        );
        let endpoint = format!("http://127.0.0.1:{port}");
        let url = format!("{endpoint}/moto-api/");
        wait_http_ok("moto to answer", &url, Duration::from_secs(30)).await;
        Moto { proc, endpoint }
    }

    /// SDK configuration for the test's own setup calls.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        sdk_config(&self.endpoint).await
    }
}

pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_credential_types::Credentials::from_keys(
            "test", "test", None,
        ))
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(5))
        .load()
        .await
}

/// Environment every shard-sd child gets: credentials for moto, region, fast timeouts.
pub fn aws_env(endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", REGION),
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("RUST_LOG", "info,shard_sd=debug"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// [`aws_env`] and `extra` on top.
pub fn aws_env_with(endpoint: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = aws_env(endpoint);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("http client")
}

/// A running `shard-sd` binary.
pub struct ShardSd {
    pub proc: Proc,
    /// The public listener (`/prometheus-targets`, health, status, metrics).
    pub addr: String,
    /// The peer listener (`/v1/changes`, `/v1/shards`, `/v1/assignment`), also
    /// its `ADVERTISE_ADDR` in sharded mode.
    pub peer_addr: String,
}

impl ShardSd {
    /// Starts shard-sd with `env` on top of a clean environment, and waits for `/healthz`.
    /// Both listeners get free loopback ports; the peer one is advertised.
    /// `PEER_LISTEN_ADDR` and `ADVERTISE_ADDR` may be given in `env`.
    pub async fn start(name: &str, env: &[(String, String)]) -> ShardSd {
        let given = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let peer_addr =
            given("PEER_LISTEN_ADDR").unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        // A port just released can be handed out again: never the peer port twice.
        let port = loop {
            let port = free_port();
            if !peer_addr.ends_with(&format!(":{port}")) {
                break port;
            }
        };
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shard-sd"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", &addr)
            .env("PEER_LISTEN_ADDR", &peer_addr);
        // Sharded replicas must be told where peers reach them (loopback is never guessed).
        if env.iter().any(|(k, _)| k == "LEASE_TABLE") {
            cmd.env("ADVERTISE_ADDR", &peer_addr);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn(&format!("shard-sd-{name}-{port}"), &mut cmd);
        let sd = ShardSd {
            proc,
            addr,
            peer_addr,
        };
        wait_http_ok(
            "shard-sd /healthz",
            &sd.url("/healthz"),
            Duration::from_secs(20),
        )
        .await;
        sd
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn peer_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.peer_addr)
    }

    pub async fn status(&self) -> serde_json::Value {
        http()
            .get(self.url("/v1/status"))
            .send()
            .await
            .expect("status request")
            .json()
            .await
            .expect("status json")
    }

    /// The `/metrics` text (OpenMetrics).
    pub async fn metrics(&self) -> String {
        http()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics text")
    }

    /// The current target groups, or `None` while the endpoint answers non-200.
    pub async fn targets(&self) -> Option<Vec<serde_json::Value>> {
        let resp = http()
            .get(self.url("/prometheus-targets"))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json().await.ok()
    }

    /// Waits until the target list satisfies `pred`, and returns it.
    pub async fn wait_targets(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        wait_for(what, timeout, || async {
            self.targets().await.filter(|t| pred(t))
        })
        .await
    }
}

/// Addresses (`ip:port`) of target groups.
pub fn addresses(groups: &[serde_json::Value]) -> Vec<String> {
    let mut out: Vec<String> = groups
        .iter()
        .flat_map(|g| g["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    out.sort();
    out
}

/// A running `synthetic-aws` on a free loopback port, started with `args`.
pub struct SyntheticAws {
    pub proc: Proc,
    pub endpoint: String,
}

impl SyntheticAws {
    pub async fn start(args: &[&str]) -> SyntheticAws {
        let port = free_port();
        let proc = Proc::spawn(
            &format!("synthetic-aws-{port}"),
            Command::new(env!("CARGO_BIN_EXE_synthetic-aws"))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(args),
        );
        let endpoint = format!("http://127.0.0.1:{port}");
        let aws = SyntheticAws { proc, endpoint };
        wait_http_ok(
            "synthetic-aws",
            &aws.url("/synthetic/stats"),
            Duration::from_secs(20),
        )
        .await;
        aws
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    /// `GET /synthetic/stats`: requests per operation, targets, tasks.
    pub async fn stats(&self) -> serde_json::Value {
        http()
            .get(self.url("/synthetic/stats"))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats JSON")
    }

    /// Requests so far of operation `op` (e.g. `DescribeTasks`).
    pub async fn requests(&self, op: &str) -> u64 {
        self.stats().await["requests"][op].as_u64().unwrap_or(0)
    }

    /// Adds ECS tasks, given as `DescribeTasks` JSON.
    pub async fn add_tasks(&self, tasks: &[serde_json::Value]) {
        let resp = http()
            .post(self.url("/synthetic/ecs-tasks"))
            .json(tasks)
            .send()
            .await
            .expect("POST ecs-tasks");
        assert!(resp.status().is_success(), "{:?}", resp.text().await);
    }
}

/// A JSON object of strings (labels) as a map; other values as "".
pub fn string_map(value: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A bridge-mode ECS task as `DescribeTasks` reports it: for each container
/// (name, container port, host port), its TCP binding for IPv4 and IPv6 as the
/// ECS agent reports it, or no binding without a host port.
pub fn bridge_task(
    id: &str,
    cluster: &str,
    containers: &[(&str, u16, Option<u16>)],
) -> serde_json::Value {
    let arn = format!("arn:aws:ecs:us-east-1:123456789012:task/{cluster}/{id}");
    let containers: Vec<serde_json::Value> = containers
        .iter()
        .map(|(name, port, host)| {
            let bindings: Vec<serde_json::Value> = host
                .iter()
                .flat_map(|h| {
                    ["0.0.0.0", "::"].map(|ip| {
                        serde_json::json!({"bindIP": ip, "containerPort": port, "hostPort": h,
                                           "protocol": "tcp"})
                    })
                })
                .collect();
            serde_json::json!({"name": name, "taskArn": arn, "lastStatus": "RUNNING",
                               "networkBindings": bindings})
        })
        .collect();
    serde_json::json!({
        "taskArn": arn,
        "clusterArn": format!("arn:aws:ecs:us-east-1:123456789012:cluster/{cluster}"),
        "lastStatus": "RUNNING",
        "launchType": "EC2",
        "containers": containers,
    })
}

/// A running `sample-app` on `ip`, with the app on `app_port` and the exporter on `exporter_port`.
pub struct SampleApp {
    pub proc: Proc,
}

impl SampleApp {
    pub async fn start(
        ip: &str,
        app_port: u16,
        exporter_port: Option<u16>,
        load_rps: f64,
    ) -> SampleApp {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sample-app"));
        cmd.args(["--listen", &format!("{ip}:{app_port}")])
            .args(["--load-rps", &load_rps.to_string()])
            .args(["--mean-latency-ms", "20"]);
        if let Some(p) = exporter_port {
            cmd.args(["--exporter-listen", &format!("{ip}:{p}")]);
        }
        let proc = Proc::spawn(&format!("sample-app-{ip}-{app_port}"), &mut cmd);
        let url = format!("http://{ip}:{app_port}/metrics");
        wait_http_ok("sample-app /metrics", &url, Duration::from_secs(10)).await;
        SampleApp { proc }
    }
}

/// A real Prometheus server, started with the given scrape configuration.
pub struct Prometheus {
    pub proc: Proc,
    pub url: String,
    _data: tempfile::TempDir,
}

impl Prometheus {
    pub async fn start(config_yaml: &str) -> Prometheus {
        let data = tempfile::tempdir().expect("tempdir");
        let cfg = data.path().join("prometheus.yml");
        std::fs::write(&cfg, config_yaml).expect("write prometheus config");
        let port = free_port();
        let proc = Proc::spawn(
            &format!("prometheus-{port}"),
            Command::new(find_tool("PROMETHEUS", "prometheus")).args([
                format!("--config.file={}", cfg.display()),
                format!("--storage.tsdb.path={}", data.path().join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
            ]),
        );
        let url = format!("http://127.0.0.1:{port}");
        let ready = format!("{url}/-/ready");
        wait_http_ok("prometheus /-/ready", &ready, Duration::from_secs(30)).await;
        Prometheus {
            proc,
            url,
            _data: data,
        }
    }

    /// `data.activeTargets` of `/api/v1/targets`.
    pub async fn active_targets(&self) -> Vec<serde_json::Value> {
        let body: serde_json::Value = http()
            .get(format!("{}/api/v1/targets?state=active", self.url))
            .send()
            .await
            .expect("targets request")
            .json()
            .await
            .expect("targets json");
        body["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Result vector of an instant query.
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        instant_query(&self.url, promql).await
    }
}

/// One term-stamped leader action read from a replica's JSON log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LeaderAction {
    /// RFC 3339 with a fixed number of digits: sorts as time does.
    pub timestamp: String,
    pub who: String,
    pub term: u64,
}

/// The leader actions (`leader_action` events) in the JSON log `text` of `who`.
pub fn leader_actions(who: &str, text: &str) -> Vec<LeaderAction> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "leader_action" || v["message"] == "leader acting")
        .filter_map(|v| {
            Some(LeaderAction {
                timestamp: v["timestamp"].as_str()?.to_owned(),
                who: who.to_owned(),
                term: v["term"].as_u64()?,
            })
        })
        .collect()
}

/// The terms in which `who` started leading, from its JSON log `text`.
pub fn leading_starts(who: &str, text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| l.contains("leading: discovering and assigning"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((who.to_owned(), v["term"].as_u64()?)))
        .collect()
}

/// Checks that leader work started at most once per term, over every replica:
/// one term is one run of the leader's work, by one replica. Returns how many
/// starts were checked.
pub fn each_term_led_once(starts: &[(String, u64)]) -> Result<usize, String> {
    let mut seen: std::collections::BTreeMap<u64, &str> = Default::default();
    for (who, term) in starts {
        if let Some(first) = seen.insert(*term, who) {
            return Err(format!(
                "leader work for term {term} started twice (by {first}, then by {who})"
            ));
        }
    }
    Ok(starts.len())
}

/// Checks, over the actions of every replica in time order, that none carries a term
/// older than one already used. Returns how many actions were checked.
pub fn terms_never_go_back(mut actions: Vec<LeaderAction>) -> Result<usize, String> {
    actions.sort();
    let mut highest: Option<&LeaderAction> = None;
    for action in &actions {
        if let Some(h) = highest.filter(|h| action.term < h.term) {
            return Err(format!(
                "{} acted with term {} at {} after {} used term {} at {}",
                action.who, action.term, action.timestamp, h.who, h.term, h.timestamp
            ));
        }
        if highest.is_none_or(|h| action.term > h.term) {
            highest = Some(action);
        }
    }
    Ok(actions.len())
}
