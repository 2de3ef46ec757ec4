//! The HTTP server: `GET /prometheus-targets` (Prometheus `http_sd`), `/healthz`,
//! `/readyz` and `/v1/status`. Handlers are thin: they copy what the discovery
//! loop published.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::state::Shared;

pub const TARGETS_PATH: &str = "/prometheus-targets";

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(TARGETS_PATH, get(targets))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .with_state(shared)
}

/// The current targets, or 503 before the first complete discovery (Prometheus
/// keeps its previous list on any non-200 answer).
async fn targets(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let Some(published) = shared.targets() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "no complete discovery yet; see /v1/status\n",
        )
            .into_response();
    };
    let etag = HeaderValue::from_str(&published.etag).unwrap_or(HeaderValue::from_static("\"\""));
    if if_none_match(&headers, &published.etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        published.body.clone(),
    )
        .into_response()
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
        "term": coordination.term,
        "leader_id": coordination.leader_id,
        "leader_addr": coordination.leader_addr,
        "live_slots": coordination.live_slots,
        "coordination_error": coordination.error,
        "version": env!("CARGO_PKG_VERSION"),
        "ready": published.is_some(),
        "targets": published.as_ref().map_or(0, |p| p.targets),
        "etag": published.as_ref().map(|p| p.etag.clone()),
        "last_discovery": status.last_discovery,
        "last_success": status.last_success,
        "namespaces": status.namespaces,
        "problems": status.problems,
        "skipped_instances": status.skipped_instances,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
