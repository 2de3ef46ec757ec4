//! A metrics backend and real collectors writing to it: VictoriaMetrics
//! single-node (Prometheus remote write in, Prometheus query API and raw export
//! out), and per replica one collector, vmagent or Prometheus in agent mode,
//! reading only that replica's `/prometheus-targets` and labelling everything it
//! writes with `collector=<name>`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use super::{free_port, http, wait_http_ok, Proc};

/// VictoriaMetrics single-node on a free loopback port.
pub struct Backend {
    pub proc: Proc,
    pub url: String,
    _data: tempfile::TempDir,
}

impl Backend {
    pub async fn start() -> Backend {
        let data = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let proc = Proc::spawn(
            &format!("victoria-metrics-{port}"),
            Command::new("victoria-metrics").args([
                format!("-httpListenAddr=127.0.0.1:{port}"),
                format!("-storageDataPath={}", data.path().display()),
                "-retentionPeriod=1d".into(),
                // Recent samples are queryable at once (30 s by default).
                "-search.latencyOffset=1s".into(),
                "-search.disableCache".into(),
            ]),
        );
        let url = format!("http://127.0.0.1:{port}");
        let health = format!("{url}/health");
        wait_http_ok("victoria-metrics /health", &health, Duration::from_secs(30)).await;
        Backend {
            proc,
            url,
            _data: data,
        }
    }

    pub fn write_url(&self) -> String {
        format!("{}/api/v1/write", self.url)
    }

    /// Result vector of an instant query.
    pub async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        super::instant_query(&self.url, promql).await
    }

    /// Every stored sample of the series `selector` matches, as (labels,
    /// [(timestamp ms, value)]): the raw data, not a query's evaluation of it.
    /// Values that are not numbers (staleness markers) are left out.
    pub async fn export(&self, selector: &str) -> Vec<(BTreeMap<String, String>, Vec<(i64, f64)>)> {
        let text = http()
            .get(format!("{}/api/v1/export", self.url))
            .query(&[("match[]", selector)])
            .send()
            .await
            .expect("export request")
            .text()
            .await
            .expect("export text");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let labels = super::string_map(&v["metric"]);
                let empty = Vec::new();
                let values = v["values"].as_array().unwrap_or(&empty);
                let stamps = v["timestamps"].as_array().unwrap_or(&empty);
                let samples = stamps
                    .iter()
                    .zip(values)
                    .filter_map(|(t, v)| Some((t.as_i64()?, v.as_f64()?)))
                    .filter(|(_, v)| v.is_finite())
                    .collect();
                (labels, samples)
            })
            .collect()
    }

    /// The installed package's version (the binary reports none).
    pub fn version(&self) -> String {
        package_version("victoria-metrics")
    }
}

/// The version of an installed Debian package.
fn package_version(name: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectorKind {
    Vmagent,
    PrometheusAgent,
}

impl CollectorKind {
    pub fn name(self) -> &'static str {
        match self {
            CollectorKind::Vmagent => "vmagent",
            CollectorKind::PrometheusAgent => "prometheus-agent",
        }
    }

    /// The collector's own version string.
    pub fn version(self) -> String {
        match self {
            // vmagent prints nothing for -version; its package says.
            CollectorKind::Vmagent => package_version("victoria-metrics"),
            CollectorKind::PrometheusAgent => Command::new("prometheus")
                .arg("--version")
                .output()
                .map(|o| {
                    let text = String::from_utf8_lossy(&o.stdout).into_owned();
                    text.lines().next().unwrap_or("").to_owned()
                })
                .unwrap_or_default(),
        }
    }
}

/// How every collector scrapes: the job's interval and timeout, and how often it
/// reads http_sd.
#[derive(Clone, Copy, Debug)]
pub struct ScrapeJob {
    pub interval: Duration,
    pub timeout: Duration,
    pub refresh: Duration,
}

/// One collector: it reads `sd_addr`'s `/prometheus-targets` as job
/// `ecs_services` and remote-writes to `backend` with `collector=<name>`.
pub struct Collector {
    pub proc: Proc,
    pub name: String,
    _data: tempfile::TempDir,
}

impl Collector {
    pub async fn start(
        kind: CollectorKind,
        name: &str,
        sd_addr: &str,
        backend: &Backend,
        job: ScrapeJob,
    ) -> Collector {
        let data = tempfile::tempdir().expect("tempdir");
        let cfg = data.path().join("scrape.yml");
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let port = free_port();
        let mut yaml = format!(
            "global:\n  scrape_interval: {}\n  scrape_timeout: {}\n",
            ms(job.interval),
            ms(job.timeout)
        );
        let proc = match kind {
            CollectorKind::Vmagent => {
                // vmagent's http_sd_configs take only a url: the refresh is a flag.
                yaml.push_str(&format!(
                    "scrape_configs:\n  - job_name: ecs_services\n    http_sd_configs:\n      \
                     - url: http://{sd_addr}/prometheus-targets\n"
                ));
                std::fs::write(&cfg, yaml).expect("write config");
                Proc::spawn(
                    &format!("vmagent-{name}-{port}"),
                    Command::new("vmagent").args([
                        format!("-promscrape.config={}", cfg.display()),
                        format!("-promscrape.httpSDCheckInterval={}", ms(job.refresh)),
                        format!("-remoteWrite.url={}", backend.write_url()),
                        format!("-remoteWrite.label=collector={name}"),
                        format!(
                            "-remoteWrite.tmpDataPath={}",
                            data.path().join("q").display()
                        ),
                        "-remoteWrite.flushInterval=500ms".into(),
                        format!("-httpListenAddr=127.0.0.1:{port}"),
                    ]),
                )
            }
            CollectorKind::PrometheusAgent => {
                yaml.push_str(&format!(
                    "  external_labels:\n    collector: {name}\n\
                     scrape_configs:\n  - job_name: ecs_services\n    http_sd_configs:\n      \
                     - url: http://{sd_addr}/prometheus-targets\n        refresh_interval: {}\n\
                     remote_write:\n  - url: {}\n    queue_config:\n      batch_send_deadline: 500ms\n",
                    ms(job.refresh),
                    backend.write_url()
                ));
                std::fs::write(&cfg, yaml).expect("write config");
                Proc::spawn(
                    &format!("prometheus-agent-{name}-{port}"),
                    Command::new("prometheus").args([
                        "--enable-feature=agent".into(),
                        format!("--config.file={}", cfg.display()),
                        format!("--storage.agent.path={}", data.path().join("wal").display()),
                        format!("--web.listen-address=127.0.0.1:{port}"),
                    ]),
                )
            }
        };
        let ready = match kind {
            CollectorKind::Vmagent => format!("http://127.0.0.1:{port}/health"),
            CollectorKind::PrometheusAgent => format!("http://127.0.0.1:{port}/-/ready"),
        };
        wait_http_ok(kind.name(), &ready, Duration::from_secs(30)).await;
        Collector {
            proc,
            name: name.to_owned(),
            _data: data,
        }
    }
}
