//! The public HTTP routes, for collectors and operators: `GET /prometheus-targets`
//! (Prometheus `http_sd`), `/healthz`, `/readyz`, `/v1/status`, `/metrics`.
//! Handlers are thin: they copy what the discovery loop or the cluster layer
//! published. The peer routes are [`crate::cluster::routes`], on their own
//! listener.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::{Serving, Shared};
use crate::telemetry::CodeLabels;

pub const TARGETS_PATH: &str = "/prometheus-targets";

/// The public routes: what collectors, load balancers and operators read.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(TARGETS_PATH, get(targets))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// The current targets, or 503 before the first complete discovery (Prometheus
/// keeps its previous list on any non-200 answer).
async fn targets(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let response = serve_targets(&shared, &headers).await;
    let code = CodeLabels {
        code: response.status().as_u16().to_string(),
    };
    shared.metrics.http_sd_requests.get_or_create(&code).inc();
    response
}

async fn serve_targets(shared: &Shared, headers: &HeaderMap) -> Response {
    let published = match shared.serving() {
        Some(Serving::List(published)) => published,
        Some(Serving::SomeoneElses) => {
            return (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                "[]",
            )
                .into_response()
        }
        None => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                "no complete discovery yet; see /v1/status\n",
            )
                .into_response()
        }
    };
    let gzip = accepts_gzip(headers);
    let tag = match gzip {
        true => published.body.gzip_etag(),
        false => published.body.etag().to_owned(),
    };
    let etag = HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"\""));
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    if if_none_match(headers, &tag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag), vary]).into_response();
    }
    // Kept compressed for clients that accept gzip; Prometheus's http_sd does not
    // ask for it, and gets the JSON inflated once per change (a very long list:
    // inflated as it is sent, with its length said so a cut-short one shows).
    let mut streamed_len = None;
    let body = match gzip {
        true => axum::body::Body::from(published.body.gzip().clone()),
        false => match published.kept_json().await {
            Ok(Some(json)) => axum::body::Body::from(json),
            Ok(None) => {
                streamed_len = published.body.json_len();
                axum::body::Body::from_stream(futures::stream::iter(
                    published.body.json_chunks(256 * 1024),
                ))
            }
            Err(err) => {
                tracing::error!("the published list does not inflate: {err}");
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        },
    };
    let mut response = (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            vary,
        ],
        body,
    )
        .into_response();
    if gzip {
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if let Some(len) = streamed_len {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    response
}

/// Whether the client accepts a gzip body (`Accept-Encoding: gzip`, not `gzip;q=0`).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// Whether `If-None-Match` matches `etag` (weak comparison, as RFC 9110 asks for GET).
fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// shard-sd's own metrics (OpenMetrics text).
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let view = shared.coordination();
    let published = shared.targets();
    let body = shared.metrics.render(
        view.role.as_str(),
        view.term.unwrap_or(0),
        published
            .as_ref()
            .and_then(|p| p.shard)
            .map_or(0, |s| s.generation),
        view.live_slots.as_ref().map_or(0, Vec::len),
        published.as_ref().map_or(0, |p| p.body.targets()),
        view.slot.is_none() && view.stale_slot.is_some(),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if shared.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no complete discovery yet\n",
        )
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let published = shared.targets();
    let status = shared.status();
    let coordination = shared.coordination();
    Json(json!({
        "replica_id": shared.replica_id,
        "advertise_addr": shared.advertise_addr,
        "role": coordination.role,
        "slot": coordination.slot,
        "stale_slot": coordination.stale_slot,
        "stale": coordination.slot.is_none() && coordination.stale_slot.is_some(),
        "term": coordination.term,
        "leader_id": coordination.leader_id,
        "leader_addr": coordination.leader_addr,
        "live_slots": coordination.live_slots,
        "coordination_error": coordination.error,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": shared.is_ready(),
        "targets": published.as_ref().map_or(0, |p| p.body.targets()),
        "etag": published.as_ref().map(|p| p.body.etag().to_owned()),
        "generation": published.as_ref().and_then(|p| p.shard).map(|s| s.generation),
        "shard_targets": published.as_ref().map(|p| p.body.targets()),
        "last_discovery": status.last_discovery,
        "last_success": status.last_success,
        "namespaces": status.namespaces,
        "problems": status.problems,
        "skipped_instances": status.skipped_instances,
        "drop_hold": status.drop_hold,
        "events": status.events,
        "rules": status.rules,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_offered_when_accepted() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(v));
            accepts_gzip(&h)
        };
        assert!(!accepts_gzip(&HeaderMap::new()));
        assert!(with("gzip"));
        assert!(with("deflate, GZIP;q=0.5"));
        assert!(with("*"));
        assert!(!with("gzip;q=0"));
        assert!(!with("br, deflate"));
    }

    #[test]
    fn etag_matching() {
        let mut h = HeaderMap::new();
        assert!(!if_none_match(&h, "\"abc\""));
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"abc\""),
        );
        assert!(if_none_match(&h, "\"abc\""));
        assert!(!if_none_match(&h, "\"ab\""));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(if_none_match(&h, "\"anything\""));
    }
}

#[cfg(test)]
mod serving_tests {
    use super::*;
    use crate::targets::Body;

    async fn served(shared: Arc<Shared>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router(shared)).await });
        format!("http://{addr}/prometheus-targets")
    }

    fn with_list(groups: usize) -> (Arc<Shared>, Vec<u8>) {
        with_list_keeping(groups, crate::state::MAX_KEPT_JSON)
    }

    fn with_list_keeping(groups: usize, keep_up_to: u64) -> (Arc<Shared>, Vec<u8>) {
        let json = format!(
            "[{}]",
            (0..groups)
                .map(|i| format!(
                    r#"{{"targets":["10.0.{}.{}:80"],"labels":{{}}}}"#,
                    i / 250,
                    i % 250
                ))
                .collect::<Vec<_>>()
                .join(",")
        )
        .into_bytes();
        let view = tokio::sync::watch::channel(crate::coordination::CoordinationView::single()).1;
        let metrics = Arc::new(crate::telemetry::Metrics::new(&Default::default()));
        let shared = Shared::new(
            "t".into(),
            "127.0.0.1:9001".into(),
            view,
            metrics,
            crate::targets::MetaLabels::All,
        );
        shared.keep_json_up_to(keep_up_to);
        shared.publish(Body::from_json(&json, groups));
        (shared, json)
    }

    /// What a client without gzip receives: the whole JSON, its length said.
    async fn fetched_as_prometheus_does(shared: Arc<Shared>, json: &[u8]) {
        let url = served(shared).await;
        let resp = reqwest::get(&url).await.expect("get");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()),
            Some(json.len().to_string().as_str())
        );
        assert!(resp.headers().get(header::CONTENT_ENCODING).is_none());
        assert_eq!(resp.bytes().await.expect("body"), json);
    }

    #[tokio::test]
    async fn a_list_too_long_to_keep_is_inflated_as_it_is_sent_with_its_length() {
        let (shared, json) = with_list_keeping(5000, 1000);
        let published = shared.targets().expect("published");
        assert!(published.kept_json().await.expect("inflates").is_none());
        fetched_as_prometheus_does(shared, &json).await;
    }

    #[tokio::test]
    async fn a_client_without_gzip_gets_the_whole_json_with_its_length() {
        let (shared, json) = with_list(5000);
        fetched_as_prometheus_does(shared.clone(), &json).await;
        let published = shared.targets().expect("published");
        assert!(published.kept_json().await.expect("inflates").is_some());
    }

    #[tokio::test]
    async fn clients_without_gzip_share_one_inflation_per_change() {
        let (shared, json) = with_list(3000);
        let url = served(shared.clone()).await;
        let client = reqwest::Client::new();
        // Prometheus's http_sd asks like this: no Accept-Encoding.
        let asks = (0..20).map(|_| {
            client
                .get(&url)
                .header(header::ACCEPT, "application/json")
                .send()
        });
        for resp in futures::future::join_all(asks).await {
            let resp = resp.expect("get");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.bytes().await.expect("body"), json);
        }
        let published = shared.targets().expect("published");
        let (a, b) = (
            published.kept_json().await.expect("inflates"),
            published.kept_json().await.expect("inflates"),
        );
        let (a, b) = (a.expect("kept"), b.expect("kept"));
        assert_eq!(a.as_ptr(), b.as_ptr(), "inflated once, shared");
        // A new list is inflated anew.
        let (_, other) = with_list(7);
        shared.publish(Body::from_json(&other, 7));
        let resp = client.get(&url).send().await.expect("get");
        assert_eq!(resp.bytes().await.expect("body"), other);
        let gzip = client
            .get(&url)
            .header(header::ACCEPT_ENCODING, "gzip")
            .send()
            .await
            .expect("get");
        assert_eq!(gzip.status(), 200);
        assert_eq!(
            crate::targets::inflate(&gzip.bytes().await.expect("body")).expect("gzip"),
            other
        );
    }
}
