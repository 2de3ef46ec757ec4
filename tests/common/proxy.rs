//! An AWS-behaviour proxy in front of moto. moto answers list calls in one page
//! and ignores `MaxResults`; real AWS pages at 100 and caps `DiscoverInstances`
//! at its `MaxResults` (default 100). The proxy restores those behaviours so tests
//! prove pagination, counts every request per operation (independent of the
//! code under test), and injects faults: throttling, errors, stalls, added
//! latency and lost responses (the call took effect, the client never hears).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;

/// The operations shard-sd calls on Cloud Map, as the proxy names them.
pub const CLOUD_MAP_OPERATIONS: &[&str] = &[
    "ListNamespaces",
    "ListServices",
    "GetService",
    "ListTagsForResource",
    "DiscoverInstances",
    "DiscoverInstancesRevision",
];

/// What the proxy does to matching requests.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Answer the next `n` requests of `op` (any op when `None`) with a throttling error.
    Throttle {
        op: Option<String>,
        remaining: u32,
        code: String,
    },
    /// Answer every request of `op` with HTTP 500.
    Fail {
        op: Option<String>,
    },
    /// Answer every request of `op` with HTTP 400 and the AWS error `code`.
    Error {
        op: Option<String>,
        code: String,
    },
    /// Never answer (the client times out).
    Hang,
    /// Forward the next `remaining` requests of `op` (any op when `None`) to moto,
    /// then never answer them: the request takes effect but the client sees a timeout.
    DropResponse {
        op: Option<String>,
        remaining: u32,
    },
    /// Answer every request of `op` (any op when `None`) only after `by`.
    Delay {
        op: Option<String>,
        by: Duration,
    },
    /// A network partition: nothing passes, in either direction, until the fault is
    /// cleared; then what was held goes through (as TCP retransmits would).
    Partition,
}

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    page_size: usize,
    counts: Mutex<BTreeMap<String, u64>>,
    fault: Mutex<Fault>,
    /// Notified whenever the fault changes.
    changed: tokio::sync::Notify,
}

pub struct AwsProxy {
    pub endpoint: String,
    state: Arc<ProxyState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl AwsProxy {
    pub async fn start(upstream: &str) -> AwsProxy {
        Self::with_page_size(upstream, 100).await
    }

    pub async fn with_page_size(upstream: &str, page_size: usize) -> AwsProxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client"),
            page_size,
            counts: Mutex::new(BTreeMap::new()),
            fault: Mutex::new(Fault::None),
            changed: tokio::sync::Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        AwsProxy {
            endpoint,
            state,
            server,
        }
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
        self.state.changed.notify_waiters();
    }

    /// Requests per operation (e.g. `ListServices`, `GetParameter`) since the last reset.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.state.counts.lock().unwrap().clone()
    }

    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    pub fn reset_counts(&self) {
        self.state.counts.lock().unwrap().clear();
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/x-amz-json-1.1")],
        body.to_string(),
    )
        .into_response()
}

/// Whether the fault applies to `op`, consuming one throttle if so.
fn take_fault(state: &ProxyState, op: &str) -> Fault {
    let mut fault = state.fault.lock().unwrap();
    let matches = |f: &Option<String>| f.as_deref().is_none_or(|want| want == op);
    match &mut *fault {
        Fault::Throttle {
            op: f,
            remaining,
            code,
        } if matches(f) && *remaining > 0 => {
            *remaining -= 1;
            Fault::Throttle {
                op: None,
                remaining: 1,
                code: code.clone(),
            }
        }
        Fault::Fail { op: f } if matches(f) => Fault::Fail { op: None },
        Fault::Error { op: f, code } if matches(f) => Fault::Error {
            op: None,
            code: code.clone(),
        },
        Fault::DropResponse { op: f, remaining } if matches(f) && *remaining > 0 => {
            *remaining -= 1;
            Fault::DropResponse {
                op: None,
                remaining: 1,
            }
        }
        Fault::Delay { op: f, by } if matches(f) => Fault::Delay { op: None, by: *by },
        Fault::Hang => Fault::Hang,
        _ => Fault::None,
    }
}

/// Waits while a partition is in force.
async fn cross_partition(state: &ProxyState) {
    loop {
        let changed = state.changed.notified();
        if *state.fault.lock().unwrap() != Fault::Partition {
            return;
        }
        changed.await;
    }
}

async fn handle(
    State(state): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("other")
        .to_owned();
    *state.counts.lock().unwrap().entry(op.clone()).or_default() += 1;

    cross_partition(&state).await;
    let fault = take_fault(&state, &op);
    match &fault {
        Fault::Throttle { code, .. } => {
            return json_response(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"__type": code, "message": "Rate exceeded"}),
            );
        }
        Fault::Error { code, .. } => {
            return json_response(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"__type": code, "message": "injected error"}),
            );
        }
        Fault::Fail { .. } => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"__type": "InternalFailure", "message": "injected failure"}),
            )
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Fault::Delay { by, .. } => tokio::time::sleep(*by).await,
        Fault::DropResponse { .. } | Fault::Partition | Fault::None => {}
    }

    let mut request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let page = match op.as_str() {
        "ListServices" => Some(("Services", take_paging(&mut request, state.page_size))),
        "ListNamespaces" => Some(("Namespaces", take_paging(&mut request, state.page_size))),
        _ => None,
    };
    let forwarded_body = if page.is_some() {
        Bytes::from(request.to_string())
    } else {
        body
    };

    let url = format!(
        "{}{}",
        state.upstream,
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut req = state.client.request(method, url).body(forwarded_body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            req = req.header(name, value);
        }
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    // A stall that began while the request was upstream swallows its answer too.
    if matches!(fault, Fault::DropResponse { .. }) || *state.fault.lock().unwrap() == Fault::Hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    cross_partition(&state).await;
    let status = resp.status();
    let resp_headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();

    let rewritten = if !status.is_success() {
        None
    } else if let Some((key, (offset, size))) = page {
        Some(paginate(&bytes, key, offset, size))
    } else if op == "DiscoverInstances" {
        let max = request
            .get("MaxResults")
            .and_then(Value::as_u64)
            .unwrap_or(100) as usize;
        Some(cap_instances(&bytes, max))
    } else {
        None
    };
    let mut out = match rewritten {
        Some(body) => (status, body).into_response(),
        None => (status, bytes).into_response(),
    };
    for (name, value) in &resp_headers {
        if name != "content-length" && name != "transfer-encoding" && name != "connection" {
            out.headers_mut().insert(name, value.clone());
        }
    }
    out
}

/// Removes `NextToken`/`MaxResults` from a list request; returns (offset, page size).
fn take_paging(request: &mut Value, page_size: usize) -> (usize, usize) {
    let Some(obj) = request.as_object_mut() else {
        return (0, page_size);
    };
    let offset = obj
        .remove("NextToken")
        .and_then(|t| {
            t.as_str()
                .and_then(|s| s.strip_prefix("offset-")?.parse().ok())
        })
        .unwrap_or(0);
    let size = obj
        .remove("MaxResults")
        .and_then(|m| m.as_u64())
        .map_or(page_size, |m| (m as usize).min(page_size));
    (offset, size)
}

fn paginate(bytes: &[u8], key: &str, offset: usize, size: usize) -> String {
    let Ok(mut body) = serde_json::from_slice::<Value>(bytes) else {
        return String::from_utf8_lossy(bytes).into_owned();
    };
    let items = body[key].as_array().cloned().unwrap_or_default();
    let end = (offset + size).min(items.len());
    let start = offset.min(end);
    body[key] = Value::Array(items[start..end].to_vec());
    if end < items.len() {
        body["NextToken"] = Value::String(format!("offset-{end}"));
    } else if let Some(obj) = body.as_object_mut() {
        obj.remove("NextToken");
    }
    body.to_string()
}

fn cap_instances(bytes: &[u8], max: usize) -> String {
    let Ok(mut body) = serde_json::from_slice::<Value>(bytes) else {
        return String::from_utf8_lossy(bytes).into_owned();
    };
    if let Some(items) = body["Instances"].as_array_mut() {
        items.truncate(max);
    }
    body.to_string()
}
