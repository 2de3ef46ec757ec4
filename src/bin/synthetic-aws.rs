//! `synthetic-aws`: a test tool, not part of shard-sd. A synthetic AWS endpoint for
//! measuring shard-sd at sizes moto cannot hold (it needs minutes for 10k
//! instances and never throttles). It speaks the real JSON protocol of SSM
//! `GetParameter` and Cloud Map `ListNamespaces`, `ListServices`, `GetService`,
//! `ListTagsForResource`, `DiscoverInstances` and `DiscoverInstancesRevision`, and
//! ECS `DescribeTasks`, so shard-sd talks to it through the real AWS SDK
//! (`AWS_ENDPOINT_URL`, or `AWS_ENDPOINT_URL_ECS` for ECS alone).
//!
//! ECS is here because moto's `DescribeTasks` reports no `networkBindings` at all
//! (moto 5.1: its containers have no such field, only a task's first container
//! is modelled, unknown ids are not listed as failures): bridge-mode tasks need
//! an endpoint that reports them. With `--bridge-every N` every Nth service runs
//! bridge-mode tasks: tagged `NETWORK_MODE=bridge`, their instances registered
//! at a shared host address with the host port of the application port, as ECS
//! registers them, and `DescribeTasks` answering each task's bindings.
//! `POST /synthetic/ecs-tasks` adds tasks given as `DescribeTasks` JSON (each
//! with `taskArn` and `clusterArn`), answered as given: for tests whose Cloud Map
//! is moto. `DescribeTasks` enforces the API's 100 tasks per call, answers
//! `ClusterNotFoundException` for a cluster it has no task of, and lists unknown
//! tasks as `MISSING` failures.
//!
//! The account is generated from a seed: `--namespaces` namespaces of
//! `--services` services each, `--instances` ECS-like instances per service
//! (attributes as ECS registers them), tags as the post uses them (a third of
//! the services also tag an ECS exporter: two targets per instance). List calls
//! page as AWS does (at most 100 per page, opaque `NextToken`),
//! `DiscoverInstances` returns at most `MaxResults` (default 100, at most 1,000).
//!
//! Throttling is a token bucket per operation, answered as AWS does. The figures:
//! - `DiscoverInstances`: 2,000 tokens refilled at 1,000 per second per account
//!   and Region, answered `RequestLimitExceeded`, as documented in "Handle AWS
//!   Cloud Map DiscoverInstances API request throttling"
//!   (<https://docs.aws.amazon.com/cloud-map/latest/dg/throttling.html>);
//! - SSM `GetParameter`: 40 per second (the default Parameter Store throughput,
//!   shared with `GetParameters`, "AWS Systems Manager endpoints and quotas",
//!   <https://docs.aws.amazon.com/general/latest/gr/ssm.html>), `ThrottlingException`;
//! - the other Cloud Map operations: AWS documents no figure; the default here is a
//!   conservative 50 per second with a burst of 100 (`--control-rps`), answered
//!   `ThrottlingException`.
//!
//! Knobs: `--latency-ms` per call, `--error-rate` (answered HTTP 500),
//! `--churn-per-s` (registrations and deregistrations per second, each bumping
//! the service's revision), `--flaps-per-s` (health changes, which, as on AWS, do
//! not). `GET /synthetic/stats` counts requests and throttles per operation;
//! `POST /synthetic/register?service=N` registers one instance and answers its
//! target address; `POST /synthetic/churn?count=N` registers and deregisters N
//! instances at random services in turn and answers how many targets changed;
//! `POST /synthetic/reset` zeroes the counters.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "synthetic-aws",
    about = "Test tool: a synthetic Cloud Map and SSM endpoint for scale measurements"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4566")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    namespaces: usize,
    /// Services per namespace.
    #[arg(long, default_value_t = 10)]
    services: usize,
    /// Instances per service.
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Added latency of every call, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of calls answered with HTTP 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Registrations plus deregistrations per second, at random services.
    #[arg(long, default_value_t = 0.0)]
    churn_per_s: f64,
    /// Health changes per second, at random instances (no revision bump).
    #[arg(long, default_value_t = 0.0)]
    flaps_per_s: f64,
    /// DiscoverInstances bucket size and refill per second.
    #[arg(long, default_value_t = 2000.0)]
    discover_burst: f64,
    #[arg(long, default_value_t = 1000.0)]
    discover_rps: f64,
    /// Bucket of each other Cloud Map operation (burst is twice this).
    #[arg(long, default_value_t = 50.0)]
    control_rps: f64,
    /// Bucket of SSM GetParameter (burst is twice this).
    #[arg(long, default_value_t = 40.0)]
    ssm_rps: f64,
    /// Every this many services run bridge-mode tasks (0: none).
    #[arg(long, default_value_t = 0)]
    bridge_every: usize,
    /// Refill of ECS DescribeTasks' bucket of 50 (the burst of the ECS guide's
    /// cluster-read example).
    #[arg(long, default_value_t = 20.0)]
    ecs_rps: f64,
}

const CLOUD_MAP: &str = "Route53AutoNaming_v20170314.";
const SSM: &str = "AmazonSSM.";
const ECS: &str = "AmazonEC2ContainerServiceV20141113.";
/// The most tasks one `DescribeTasks` may name.
const DESCRIBE_TASKS_MAX: usize = 100;
const PAGE: usize = 100;
const ACCOUNT: &str = "123456789012";
const REGION: &str = "us-east-1";

struct Namespace {
    id: String,
    name: String,
    kind: &'static str,
}

struct Service {
    id: String,
    name: String,
    namespace: usize,
    /// Application port tag; and an exporter port for a third of the services.
    port: u16,
    exporter: bool,
    /// Its tasks run in bridge mode: registered at their host's address.
    bridge: bool,
    /// Instance numbers (global, so addresses are unique).
    instances: Vec<u32>,
    revision: i64,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
struct Bucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            tokens: burst,
            burst,
            rate,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Account {
    namespaces: Vec<Namespace>,
    services: Vec<Service>,
    /// Service index by id, by ARN and by (namespace name, service name).
    by_id: std::collections::HashMap<String, usize>,
    by_arn: std::collections::HashMap<String, usize>,
    by_name: std::collections::HashMap<(String, String), usize>,
    unhealthy: HashSet<u32>,
    next_instance: u32,
    /// Bridge-mode tasks by task id: (service, instance number).
    bridge_tasks: std::collections::HashMap<String, (usize, u32)>,
    /// Tasks given by a test, as `DescribeTasks` JSON, by task id.
    given_tasks: std::collections::HashMap<String, Value>,
    buckets: BTreeMap<&'static str, Bucket>,
    requests: BTreeMap<String, u64>,
    throttled: BTreeMap<String, u64>,
    rng: fastrand::Rng,
}

struct Synthetic {
    account: Mutex<Account>,
    latency: Duration,
    error_rate: f64,
}

/// An ECS task id: 32 hex digits, stable for an instance number.
fn task_id(n: u32) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(&n.to_le_bytes());
    format!("{h:032x}")
}

/// 10.a.b.c, unique per instance number.
fn address(n: u32) -> String {
    let n = n + 1;
    format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
}

/// The EC2 host of a bridge-mode task: eight tasks share one, 172.16.a.b.
fn host_address(n: u32) -> String {
    let h = n / 8 + 1;
    format!("172.16.{}.{}", (h >> 8) & 255, h & 255)
}

/// The dynamic host port of a bridge-mode task's application port; its
/// exporter's is the next one.
fn host_port(n: u32) -> u16 {
    32768 + ((n * 2) % 28000) as u16
}

/// The ECS cluster of a namespace's tasks.
fn cluster_of(namespace: usize) -> String {
    format!("cluster-{}", namespace % 4)
}

/// The id at the end of an ARN, or the id itself.
fn last_segment(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

impl Account {
    fn generate(args: &Args) -> Account {
        let mut rng = fastrand::Rng::with_seed(args.seed);
        let namespaces: Vec<Namespace> = (0..args.namespaces)
            .map(|i| Namespace {
                id: format!("ns-{:016x}", rng.u64(..)),
                name: format!("team-{i}.internal"),
                kind: if i % 2 == 0 { "DNS_PRIVATE" } else { "HTTP" },
            })
            .collect();
        let mut services = Vec::new();
        let mut next_instance = 0u32;
        for ns in 0..args.namespaces {
            for s in 0..args.services {
                let instances = (0..args.instances as u32)
                    .map(|k| next_instance + k)
                    .collect();
                next_instance += args.instances as u32;
                services.push(Service {
                    id: format!("srv-{:016x}", rng.u64(..)),
                    name: format!("svc-{s}"),
                    namespace: ns,
                    port: [3000, 8080, 9090, 8000][rng.usize(0..4)],
                    exporter: rng.u8(0..3) == 0,
                    bridge: args.bridge_every > 0 && services.len() % args.bridge_every == 0,
                    instances,
                    revision: 1,
                });
            }
        }
        let bucket = |rate: f64| Bucket::new(rate, rate * 2.0);
        let buckets = BTreeMap::from([
            (
                "DiscoverInstances",
                Bucket::new(args.discover_rps, args.discover_burst),
            ),
            ("DiscoverInstancesRevision", bucket(args.control_rps)),
            ("ListNamespaces", bucket(args.control_rps)),
            ("ListServices", bucket(args.control_rps)),
            ("GetService", bucket(args.control_rps)),
            ("ListTagsForResource", bucket(args.control_rps)),
            ("GetParameter", bucket(args.ssm_rps)),
            ("DescribeTasks", Bucket::new(args.ecs_rps, 50.0)),
        ]);
        let bridge_tasks = services
            .iter()
            .enumerate()
            .filter(|(_, s)| s.bridge)
            .flat_map(|(i, s)| s.instances.iter().map(move |n| (task_id(*n), (i, *n))))
            .collect();
        let by_id = services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let by_arn = services
            .iter()
            .enumerate()
            .map(|(i, s)| (Account::arn("service", &s.id), i))
            .collect();
        let by_name = services
            .iter()
            .enumerate()
            .map(|(i, s)| ((namespaces[s.namespace].name.clone(), s.name.clone()), i))
            .collect();
        Account {
            namespaces,
            services,
            by_id,
            by_arn,
            by_name,
            unhealthy: HashSet::new(),
            next_instance,
            bridge_tasks,
            given_tasks: Default::default(),
            buckets,
            requests: BTreeMap::new(),
            throttled: BTreeMap::new(),
            rng,
        }
    }

    fn arn(kind: &str, id: &str) -> String {
        format!("arn:aws:servicediscovery:{REGION}:{ACCOUNT}:{kind}/{id}")
    }

    fn targets(&self) -> usize {
        self.services
            .iter()
            .map(|s| s.instances.len() * if s.exporter { 2 } else { 1 })
            .sum()
    }

    fn register(&mut self, service: usize) -> Option<String> {
        let n = self.next_instance;
        let svc = self.services.get_mut(service)?;
        self.next_instance += 1;
        svc.instances.push(n);
        svc.revision += 1;
        if svc.bridge {
            self.bridge_tasks.insert(task_id(n), (service, n));
            return Some(format!("{}:{}", host_address(n), host_port(n)));
        }
        Some(format!("{}:{}", address(n), svc.port))
    }

    fn churn(&mut self) {
        if self.services.is_empty() {
            return;
        }
        let i = self.rng.usize(0..self.services.len());
        if self.rng.bool() {
            self.register(i);
        } else {
            self.deregister_one(i);
        }
    }

    /// Deregisters one instance of service `i` at random; returns whether it had one.
    fn deregister_one(&mut self, i: usize) -> bool {
        let k = match self.services[i].instances.len() {
            0 => return false,
            n => self.rng.usize(0..n),
        };
        let svc = &mut self.services[i];
        svc.instances.swap_remove(k);
        svc.revision += 1;
        true
    }

    /// `count` changes at random services, registrations and deregistrations in
    /// turn; returns how many targets appeared or went.
    fn churn_now(&mut self, count: usize) -> usize {
        let mut targets = 0;
        for k in 0..count {
            if self.services.is_empty() {
                break;
            }
            let i = self.rng.usize(0..self.services.len());
            let per = if self.services[i].exporter { 2 } else { 1 };
            if k % 2 == 0 {
                self.register(i);
                targets += per;
            } else if self.deregister_one(i) {
                targets += per;
            }
        }
        targets
    }

    fn flap(&mut self) {
        if self.next_instance == 0 {
            return;
        }
        let n = self.rng.u32(0..self.next_instance);
        if !self.unhealthy.remove(&n) {
            self.unhealthy.insert(n);
        }
    }

    fn service_by_name(&self, namespace: &str, service: &str) -> Option<&Service> {
        let i = self
            .by_name
            .get(&(namespace.to_owned(), service.to_owned()))?;
        self.services.get(*i)
    }

    fn instance_json(&self, ns: &Namespace, svc: &Service, n: u32) -> Value {
        let healthy = !self.unhealthy.contains(&n);
        let zone = ["us-east-1a", "us-east-1b", "us-east-1c"][n as usize % 3];
        let mut instance = json!({
            "InstanceId": task_id(n),
            "NamespaceName": ns.name,
            "ServiceName": svc.name,
            "HealthStatus": if healthy { "HEALTHY" } else { "UNHEALTHY" },
            "Attributes": {
                "AWS_INSTANCE_IPV4": address(n),
                "AVAILABILITY_ZONE": zone,
                "AWS_INIT_HEALTH_STATUS": "HEALTHY",
                "ECS_CLUSTER_NAME": cluster_of(svc.namespace),
                "ECS_SERVICE_NAME": svc.name,
                "ECS_TASK_DEFINITION_FAMILY": format!("{}-task", svc.name),
                "REGION": REGION,
            }
        });
        if svc.bridge {
            // As ECS registers a bridge-mode task (SRV): its host's address and
            // the host port of the registered container port.
            let attributes = &mut instance["Attributes"];
            attributes["AWS_INSTANCE_IPV4"] = json!(host_address(n));
            attributes["AWS_INSTANCE_PORT"] = json!(host_port(n).to_string());
            attributes["EC2_INSTANCE_ID"] = json!(format!("i-{:017x}", n / 8));
        }
        instance
    }

    /// A bridge-mode task as `DescribeTasks` shows it: one container per port,
    /// each binding for IPv4 and IPv6, as the ECS agent reports them.
    fn task_json(&self, svc: &Service, n: u32) -> Value {
        let cluster = cluster_of(svc.namespace);
        let task_arn = format!(
            "arn:aws:ecs:{REGION}:{ACCOUNT}:task/{cluster}/{}",
            task_id(n)
        );
        let container = |name: &str, container_port: u16, host_port: u16| {
            let binding = |ip: &str| {
                json!({"bindIP": ip, "containerPort": container_port, "hostPort": host_port,
                       "protocol": "tcp"})
            };
            json!({"name": name, "taskArn": task_arn, "lastStatus": "RUNNING",
                   "networkBindings": [binding("0.0.0.0"), binding("::")]})
        };
        let mut containers = vec![container("app", svc.port, host_port(n))];
        if svc.exporter {
            containers.push(container("ecs-exporter", 9779, host_port(n) + 1));
        }
        json!({
            "taskArn": task_arn,
            "clusterArn": format!("arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{cluster}"),
            "lastStatus": "RUNNING",
            "launchType": "EC2",
            "attachments": [],
            "containers": containers,
        })
    }

    /// `DescribeTasks`: each task named, given ones first, in the cluster asked.
    fn describe_tasks(&self, request: &Value) -> Response {
        let cluster = last_segment(request["cluster"].as_str().unwrap_or("default")).to_owned();
        let names: Vec<&str> = request["tasks"]
            .as_array()
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if names.is_empty() || names.len() > DESCRIBE_TASKS_MAX {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterException",
                "Tasks must name between 1 and 100 tasks.",
            );
        }
        let in_cluster =
            |task: &Value| task["clusterArn"].as_str().map(last_segment) == Some(cluster.as_str());
        let known_cluster = self.given_tasks.values().any(in_cluster)
            || self
                .services
                .iter()
                .any(|s| s.bridge && cluster_of(s.namespace) == cluster);
        if !known_cluster {
            return error(
                StatusCode::BAD_REQUEST,
                "ClusterNotFoundException",
                "Cluster not found.",
            );
        }
        let mut tasks = Vec::new();
        let mut failures = Vec::new();
        for name in names {
            let id = last_segment(name);
            let found = match self.given_tasks.get(id) {
                Some(task) => Some(task.clone()),
                None => self
                    .bridge_tasks
                    .get(id)
                    .map(|(i, n)| self.task_json(&self.services[*i], *n)),
            };
            match found.filter(in_cluster) {
                Some(task) => tasks.push(task),
                None => failures.push(json!({
                    "arn": format!("arn:aws:ecs:{REGION}:{ACCOUNT}:task/{cluster}/{id}"),
                    "reason": "MISSING",
                })),
            }
        }
        ok(json!({ "tasks": tasks, "failures": failures }))
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/x-amz-json-1.1")],
        json!({"__type": code, "message": message}).to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    (
        [("content-type", "application/x-amz-json-1.1")],
        body.to_string(),
    )
        .into_response()
}

/// An opaque page token over an offset.
fn page(request: &Value, len: usize) -> (usize, usize, Option<String>) {
    let offset = request["NextToken"]
        .as_str()
        .and_then(|t| t.strip_prefix("page-"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0usize)
        .min(len);
    let size = request["MaxResults"]
        .as_u64()
        .map_or(PAGE, |m| (m as usize).clamp(1, PAGE));
    let end = (offset + size).min(len);
    let next = (end < len).then(|| format!("page-{end}"));
    (offset, end, next)
}

fn answer(account: &Account, op: &str, request: &Value) -> Response {
    match op {
        "GetParameter" => {
            let names: Vec<&str> = account.namespaces.iter().map(|n| n.name.as_str()).collect();
            ok(json!({"Parameter": {
                "Name": request["Name"],
                "Type": "StringList",
                "Value": names.join(","),
                "Version": 1,
                "DataType": "text",
            }}))
        }
        "ListNamespaces" => {
            let (from, to, next) = page(request, account.namespaces.len());
            let items: Vec<Value> = account.namespaces[from..to]
                .iter()
                .map(|n| {
                    json!({"Id": n.id, "Arn": Account::arn("namespace", &n.id), "Name": n.name,
                           "Type": n.kind})
                })
                .collect();
            let mut body = json!({ "Namespaces": items });
            if let Some(next) = next {
                body["NextToken"] = json!(next);
            }
            ok(body)
        }
        "ListServices" => {
            // Real AWS honours the NAMESPACE_ID filter.
            let wanted: Option<HashSet<&str>> = request["Filters"].as_array().and_then(|fs| {
                fs.iter()
                    .find(|f| f["Name"] == "NAMESPACE_ID")
                    .and_then(|f| f["Values"].as_array())
                    .map(|v| v.iter().filter_map(Value::as_str).collect())
            });
            let listed: Vec<&Service> = account
                .services
                .iter()
                .filter(|s| {
                    wanted
                        .as_ref()
                        .is_none_or(|w| w.contains(account.namespaces[s.namespace].id.as_str()))
                })
                .collect();
            let (from, to, next) = page(request, listed.len());
            let items: Vec<Value> = listed[from..to]
                .iter()
                .map(|s| json!({"Id": s.id, "Arn": Account::arn("service", &s.id), "Name": s.name}))
                .collect();
            let mut body = json!({ "Services": items });
            if let Some(next) = next {
                body["NextToken"] = json!(next);
            }
            ok(body)
        }
        "GetService" => match request["Id"]
            .as_str()
            .and_then(|id| account.by_id.get(id))
            .map(|i| &account.services[*i])
        {
            Some(s) => ok(json!({"Service": {
                "Id": s.id, "Arn": Account::arn("service", &s.id), "Name": s.name,
                "NamespaceId": account.namespaces[s.namespace].id,
            }})),
            None => error(
                StatusCode::BAD_REQUEST,
                "ServiceNotFound",
                "no such service",
            ),
        },
        "ListTagsForResource" => {
            let arn = request["ResourceARN"].as_str().unwrap_or_default();
            match account.by_arn.get(arn).map(|i| &account.services[*i]) {
                Some(s) => {
                    let mut tags = vec![
                        json!({"Key": "METRICS_PATH", "Value": "/metrics"}),
                        json!({"Key": "METRICS_PORT", "Value": s.port.to_string()}),
                        json!({"Key": "team", "Value": format!("team-{}", s.namespace)}),
                    ];
                    if s.exporter {
                        tags.push(json!({"Key": "ECS_METRICS_PATH", "Value": "/metrics"}));
                        tags.push(json!({"Key": "ECS_METRICS_PORT", "Value": "9779"}));
                    }
                    if s.bridge {
                        tags.push(json!({"Key": "NETWORK_MODE", "Value": "bridge"}));
                    }
                    ok(json!({ "Tags": tags }))
                }
                None => error(
                    StatusCode::BAD_REQUEST,
                    "ResourceNotFoundException",
                    "no such resource",
                ),
            }
        }
        "DiscoverInstances" | "DiscoverInstancesRevision" => {
            let ns = request["NamespaceName"].as_str().unwrap_or_default();
            let name = request["ServiceName"].as_str().unwrap_or_default();
            let Some(svc) = account.service_by_name(ns, name) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "NamespaceNotFound",
                    "no such service",
                );
            };
            if op == "DiscoverInstancesRevision" {
                return ok(json!({ "InstancesRevision": svc.revision }));
            }
            let namespace = &account.namespaces[svc.namespace];
            let max = request["MaxResults"]
                .as_u64()
                .map_or(100, |m| (m as usize).clamp(1, 1000));
            let health = request["HealthStatus"].as_str().unwrap_or("ALL");
            let healthy = |n: &u32| !account.unhealthy.contains(n);
            let any_healthy = svc.instances.iter().any(healthy);
            let selected: Vec<Value> = svc
                .instances
                .iter()
                .filter(|n| match health {
                    "HEALTHY" => healthy(n),
                    "UNHEALTHY" => !healthy(n),
                    "HEALTHY_OR_ELSE_ALL" => healthy(n) || !any_healthy,
                    _ => true,
                })
                .take(max)
                .map(|n| account.instance_json(namespace, svc, *n))
                .collect();
            ok(json!({ "Instances": selected, "InstancesRevision": svc.revision }))
        }
        "DescribeTasks" => account.describe_tasks(request),
        _ => error(
            StatusCode::BAD_REQUEST,
            "UnknownOperationException",
            "not served by synthetic-aws",
        ),
    }
}

async fn handle(State(state): State<Arc<Synthetic>>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let op = target
        .strip_prefix(CLOUD_MAP)
        .or_else(|| target.strip_prefix(SSM))
        .or_else(|| target.strip_prefix(ECS))
        .unwrap_or("other")
        .to_owned();
    if !state.latency.is_zero() {
        tokio::time::sleep(state.latency).await;
    }
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut account = state.account.lock().unwrap_or_else(|e| e.into_inner());
    *account.requests.entry(op.clone()).or_default() += 1;
    let throttled = account
        .buckets
        .get_mut(op.as_str())
        .is_some_and(|b| !b.take());
    if throttled {
        *account.throttled.entry(op.clone()).or_default() += 1;
        let code = if op == "DiscoverInstances" {
            "RequestLimitExceeded"
        } else {
            "ThrottlingException"
        };
        return error(StatusCode::BAD_REQUEST, code, "Rate exceeded");
    }
    if state.error_rate > 0.0 && account.rng.f64() < state.error_rate {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
            "injected failure",
        );
    }
    answer(&account, &op, &request)
}

async fn stats(State(state): State<Arc<Synthetic>>) -> Json<Value> {
    let account = state.account.lock().unwrap_or_else(|e| e.into_inner());
    Json(json!({
        "requests": account.requests,
        "throttled": account.throttled,
        "namespaces": account.namespaces.len(),
        "services": account.services.len(),
        "instances": account.services.iter().map(|s| s.instances.len()).sum::<usize>(),
        "bridge_tasks": account.bridge_tasks.len(),
        "targets": account.targets(),
    }))
}

async fn reset(State(state): State<Arc<Synthetic>>) -> StatusCode {
    let mut account = state.account.lock().unwrap_or_else(|e| e.into_inner());
    account.requests.clear();
    account.throttled.clear();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct RegisterQuery {
    #[serde(default)]
    service: usize,
}

async fn register(State(state): State<Arc<Synthetic>>, Query(q): Query<RegisterQuery>) -> Response {
    let mut account = state.account.lock().unwrap_or_else(|e| e.into_inner());
    match account.register(q.service) {
        Some(target) => target.into_response(),
        None => (StatusCode::NOT_FOUND, "no such service\n").into_response(),
    }
}

/// Adds or replaces tasks given as `DescribeTasks` JSON; answers how many.
async fn given_tasks(
    State(state): State<Arc<Synthetic>>,
    Json(tasks): Json<Vec<Value>>,
) -> Response {
    let mut account = state.account.lock().unwrap_or_else(|e| e.into_inner());
    for task in &tasks {
        let (Some(arn), Some(_)) = (task["taskArn"].as_str(), task["clusterArn"].as_str()) else {
            return (
                StatusCode::BAD_REQUEST,
                "each task needs taskArn and clusterArn\n",
            )
                .into_response();
        };
        account
            .given_tasks
            .insert(last_segment(arn).to_owned(), task.clone());
    }
    tasks.len().to_string().into_response()
}

#[derive(Deserialize)]
struct ChurnQuery {
    count: usize,
}

async fn churn(State(state): State<Arc<Synthetic>>, Query(q): Query<ChurnQuery>) -> String {
    let mut account = state.account.lock().unwrap_or_else(|e| e.into_inner());
    account.churn_now(q.count).to_string()
}

/// Applies `per_s` random changes a second with `change`, in ten steps a second.
fn spawn_changes(state: Arc<Synthetic>, per_s: f64, change: fn(&mut Account)) {
    if per_s <= 0.0 {
        return;
    }
    tokio::spawn(async move {
        let mut owed = 0.0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            owed += per_s / 10.0;
            let mut account = state.account.lock().unwrap_or_else(|e| e.into_inner());
            while owed >= 1.0 {
                change(&mut account);
                owed -= 1.0;
            }
        }
    });
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let account = Account::generate(&args);
    eprintln!(
        "synthetic-aws: {} namespaces, {} services, {} targets on {}",
        account.namespaces.len(),
        account.services.len(),
        account.targets(),
        args.listen
    );
    let state = Arc::new(Synthetic {
        account: Mutex::new(account),
        latency: Duration::from_millis(args.latency_ms),
        error_rate: args.error_rate,
    });
    spawn_changes(state.clone(), args.churn_per_s, Account::churn);
    spawn_changes(state.clone(), args.flaps_per_s, Account::flap);
    let app = Router::new()
        .route("/synthetic/stats", get(stats))
        .route("/synthetic/reset", post(reset))
        .route("/synthetic/register", post(register))
        .route("/synthetic/churn", post(churn))
        .route("/synthetic/ecs-tasks", post(given_tasks))
        .fallback(handle)
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
