//! A sharded cluster for fault tests: moto, one proxy in front of it for Cloud Map
//! and SSM shared by every replica, and one proxy per replica for DynamoDB
//! (`AWS_ENDPOINT_URL_DYNAMODB`), so a fault can hit one replica's lease table or
//! all of them. Targets are registered instances on 127.0.x.y (nobody scrapes
//! them here: the tests read the http_sd lists).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::cloudmap::{CloudMap, Service};
use super::proxy::{AwsProxy, Fault};
use super::{addresses, aws_env, wait_for, Moto, ShardSd};

pub const LEASE: Duration = Duration::from_secs(3);
pub const HEARTBEAT: Duration = Duration::from_millis(500);
pub const TOKEN: &str = "fault-test-token";

/// Starts replica `id` over `shard_count` slots with fast leases (3 s, heartbeat
/// 500 ms), Cloud Map and SSM through `cloud`, DynamoDB through a proxy of its own,
/// JSON logs with term-stamped leader actions; `env` comes last and wins.
///
/// Peers reach it through a proxy of its own (its `ADVERTISE_ADDR`), so a test can
/// cut it off from the other replicas while DynamoDB and AWS still answer.
pub async fn start_replica(
    moto: &Moto,
    cloud: &AwsProxy,
    id: &str,
    shard_count: &str,
    env: &[(String, String)],
) -> Replica {
    let dynamodb = AwsProxy::start(&moto.endpoint).await;
    let peer_listen = format!("127.0.0.1:{}", super::free_port());
    let peers = AwsProxy::start(&format!("http://{peer_listen}")).await;
    let advertise = peers.endpoint.trim_start_matches("http://").to_owned();
    let mut all = aws_env(&cloud.endpoint);
    all.retain(|(k, _)| k != "RUST_LOG");
    for (k, v) in [
        ("PEER_LISTEN_ADDR", peer_listen.as_str()),
        ("ADVERTISE_ADDR", advertise.as_str()),
        ("AWS_ENDPOINT_URL_DYNAMODB", dynamodb.endpoint.as_str()),
        ("LEASE_TABLE", "leases"),
        ("CREATE_TABLE", "true"),
        ("SHARD_COUNT", shard_count),
        ("REPLICA_ID", id),
        ("LEASE_DURATION", "3s"),
        ("HEARTBEAT_INTERVAL", "500ms"),
        ("HANDOFF_GRACE", "2s"),
        ("MEMBERSHIP_GRACE", "1500ms"),
        ("PEER_TOKEN", TOKEN),
        ("CONFIG_RELOAD_FREQUENCY", "1"),
        ("AWS_CALL_TIMEOUT", "2s"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info,leader_action=debug,handoff=debug"),
    ] {
        all.push((k.into(), v.into()));
    }
    all.extend(env.iter().cloned());
    let sd = ShardSd::start(id, &all).await;
    Replica {
        id: id.to_owned(),
        sd,
        dynamodb,
        peers,
    }
}

pub struct Replica {
    pub id: String,
    pub sd: ShardSd,
    /// This replica's own way to DynamoDB.
    pub dynamodb: AwsProxy,
    /// The other replicas' way to this one's peer listener.
    pub peers: AwsProxy,
}

pub struct Cluster {
    pub moto: Moto,
    /// Cloud Map and SSM, for every replica.
    pub cloud: AwsProxy,
    /// Setup calls, straight to moto.
    pub cm: CloudMap,
    pub svc: Service,
    pub replicas: Vec<Option<Replica>>,
    pub shard_count: String,
    pub expected: BTreeSet<String>,
    /// Extra environment of new replicas.
    pub extra_env: Vec<(String, String)>,
}

impl Cluster {
    /// `replicas` replicas over `shard_count` slots, `targets` registered targets.
    pub async fn start(shard_count: &str, replicas: usize, targets: usize) -> Cluster {
        let moto = Moto::start().await;
        let cloud = AwsProxy::start(&moto.endpoint).await;
        let cm = CloudMap::new(&moto.sdk_config().await);
        let ns = cm.dns_namespace("ecs-services").await;
        let svc = cm
            .service(
                &ns,
                "bulk-svc",
                &[("METRICS_PATH", "/metrics"), ("METRICS_PORT", "3000")],
            )
            .await;
        let mut cluster = Cluster {
            moto,
            cloud,
            cm,
            svc,
            replicas: Vec::new(),
            shard_count: shard_count.into(),
            expected: BTreeSet::new(),
            extra_env: Vec::new(),
        };
        cluster.register(0..targets).await;
        for _ in 0..replicas {
            cluster.add_replica().await;
        }
        cluster
    }

    /// Registers targets `bulk-{i}` at 127.0.{100 + i / 200}.{i % 200 + 1}:3000.
    pub async fn register(&mut self, range: std::ops::Range<usize>) {
        for i in range {
            let ip = format!("127.0.{}.{}", 100 + i / 200, i % 200 + 1);
            self.cm
                .register_task(&self.svc.id, &format!("bulk-{i}"), &ip)
                .await;
            self.expected.insert(format!("{ip}:3000"));
        }
    }

    pub async fn add_replica(&mut self) -> usize {
        let i = self.replicas.len();
        let mut env = vec![("DISCOVERY_NAMESPACES".to_owned(), "ecs-services".to_owned())];
        env.extend(self.extra_env.iter().cloned());
        let replica = start_replica(
            &self.moto,
            &self.cloud,
            &format!("r{i}"),
            &self.shard_count,
            &env,
        )
        .await;
        self.replicas.push(Some(replica));
        i
    }

    pub fn alive(&self) -> Vec<&Replica> {
        self.replicas.iter().flatten().collect()
    }

    pub fn addrs(&self) -> Vec<String> {
        self.alive().iter().map(|r| r.sd.addr.clone()).collect()
    }

    pub fn replica(&self, i: usize) -> &Replica {
        self.replicas[i].as_ref().expect("replica is running")
    }

    /// Sets `fault` on every running replica's DynamoDB proxy.
    pub fn dynamodb_fault(&self, fault: Fault) {
        for r in self.alive() {
            r.dynamodb.set_fault(fault.clone());
        }
    }

    pub async fn statuses(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for r in self.alive() {
            out.push(r.sd.status().await);
        }
        out
    }

    /// Index and status of the leader.
    pub async fn leader(&self) -> (usize, serde_json::Value) {
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(r) = r {
                let s = r.sd.status().await;
                if s["role"] == "leader" {
                    return (i, s);
                }
            }
        }
        panic!("no leader");
    }

    /// Waits until every replica is ready and `serving` replicas' shards cover the
    /// registered set exactly once; returns each replica's targets by address.
    pub async fn settle(&self, what: &str, serving: usize) -> BTreeMap<String, Vec<String>> {
        wait_for(what, Duration::from_secs(30), || async {
            let shards = shards(&self.addrs()).await;
            let all: Vec<&String> = shards.values().flatten().collect();
            let union: BTreeSet<String> = all.iter().map(|t| t.to_string()).collect();
            let ready = self.statuses().await.iter().all(|s| s["ready"] == true);
            let busy = shards.values().filter(|s| !s.is_empty()).count();
            (ready && union == self.expected && all.len() == self.expected.len() && busy == serving)
                .then_some(shards)
        })
        .await
    }
}

/// Each replica's current targets; replicas that do not answer 200 are left out.
pub async fn shards(addrs: &[String]) -> BTreeMap<String, Vec<String>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .no_proxy()
        .build()
        .expect("client");
    let requests = addrs.iter().map(|a| {
        let client = client.clone();
        async move {
            let resp = client
                .get(format!("http://{a}/prometheus-targets"))
                .send()
                .await
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let groups: Vec<serde_json::Value> = resp.json().await.ok()?;
            Some((a.clone(), addresses(&groups)))
        }
    });
    futures::future::join_all(requests)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// What collectors hold, sampled every 100 ms the way Prometheus reads http_sd:
/// a 200 replaces a collector's list, anything else keeps it.
pub struct Collectors {
    lists: BTreeMap<String, Vec<String>>,
}

impl Collectors {
    pub fn new() -> Self {
        Collectors {
            lists: BTreeMap::new(),
        }
    }

    /// Refreshes from every address; returns the targets of `expected` held by nobody.
    pub async fn sample(&mut self, addrs: &[String], expected: &BTreeSet<String>) -> Vec<String> {
        self.lists.extend(shards(addrs).await);
        let held: BTreeSet<&String> = self.lists.values().flatten().collect();
        expected
            .iter()
            .filter(|t| !held.contains(t))
            .cloned()
            .collect()
    }

    pub fn list(&self, addr: &str) -> Option<&Vec<String>> {
        self.lists.get(addr)
    }

    /// The task at `addr` stopped: its collector stopped with it.
    pub fn forget(&mut self, addr: &str) {
        self.lists.remove(addr);
    }
}

impl Default for Collectors {
    fn default() -> Self {
        Self::new()
    }
}

/// `message` fields of a replica's JSON log lines that contain `needle`.
pub fn log_lines(sd: &ShardSd, needle: &str) -> Vec<serde_json::Value> {
    sd.proc
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
