//! The HTTP routes, in two routers with their own policies. The public one, for
//! collectors and operators: `GET /prometheus-targets` (Prometheus `http_sd`),
//! `/healthz`, `/readyz`, `/v1/status`, `/metrics`. The peer one, for replicas only
//! (its own listener, `PEER_LISTEN_ADDR`, behind `PEER_TOKEN`): `/v1/shards/{slot}`,
//! `/v1/snapshot`, `/v1/assignment`. Handlers are thin: they copy what the
//! discovery loop or the leader published.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::assignment::{AssignedSlot, AssignmentDoc, SNAPSHOT_CONTENT_TYPE};
use crate::follower::{GENERATION_HEADER, TERM_HEADER};
use crate::leader::{self, LeaderHandle};
use crate::state::Shared;
use crate::telemetry::CodeLabels;

pub const TARGETS_PATH: &str = "/prometheus-targets";

/// Longest long-poll a follower may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// State of the peer routes.
#[derive(Clone)]
struct PeerState {
    shared: Arc<Shared>,
    /// Cancelled when the replica stops: long-polls end at once instead of holding
    /// the process past its stop timeout.
    stopping: CancellationToken,
}

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

/// The peer routes, for other replicas only, behind one authentication layer.
pub fn peer_router(
    shared: Arc<Shared>,
    peer_token: Option<String>,
    stopping: CancellationToken,
) -> Router {
    let token: Option<Arc<str>> = peer_token.map(Arc::from);
    Router::new()
        .route("/v1/shards/{slot}", get(shard))
        .route("/v1/assignment", get(assignment))
        .route("/v1/snapshot", get(snapshot))
        .with_state(PeerState { shared, stopping })
        .layer(middleware::from_fn_with_state(token, require_token))
}

/// 401 unless the request carries `PEER_TOKEN` (when one is set).
async fn require_token(
    State(token): State<Option<Arc<str>>>,
    request: Request,
    next: Next,
) -> Response {
    if authorized(token.as_deref(), request.headers()) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            "PEER_TOKEN required: send Authorization: Bearer <token>\n",
        )
            .into_response()
    }
}

/// Compares the bearer token in constant time.
fn authorized(token: Option<&str>, headers: &HeaderMap) -> bool {
    let Some(expected) = token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The answer of a peer route on a replica that is not the leader.
struct NotLeader;

impl IntoResponse for NotLeader {
    fn into_response(self) -> Response {
        (StatusCode::SERVICE_UNAVAILABLE, "not the leader\n").into_response()
    }
}

/// The leader's assignment, or 503 on a replica that does not lead now: fenced by
/// the term, so an assignment of a term that ended (the lease lapsed, or was
/// re-taken as a new term) is never served.
fn leader_of(state: &PeerState) -> Result<Arc<LeaderHandle>, NotLeader> {
    let leading = leader::leading_term(&state.shared.coordination());
    state
        .shared
        .leader()
        .filter(|h| !h.has_ended() && leading == Some(h.term()))
        .ok_or(NotLeader)
}

fn term_ended() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "no longer the leader\n").into_response()
}

fn stopping() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
}

#[derive(Deserialize)]
struct ShardQuery {
    #[serde(default)]
    after_term: u64,
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait_ms: u64,
    /// The asking replica; its confirmation counts only if it holds the slot.
    #[serde(default)]
    holder: Option<String>,
}

impl ShardQuery {
    /// Whether the asker should get the copy of (`term`, `generation`) at once,
    /// `latest` being the generation published last: it holds an older one, or
    /// one of this term never published here, which no answer would ever follow.
    fn lags(&self, term: u64, generation: u64, latest: u64) -> bool {
        (term, generation) > (self.after_term, self.after)
            || (self.after_term == term && self.after > latest)
    }
}

/// A slot's shard for its holder: immediately if newer than (`after_term`,
/// `after`), else when it changes or after `wait_ms` (304). Asking with the
/// leader's term confirms that generation (ending handoffs to this slot), when
/// the asker names itself as `holder` and the leader sees it holding the slot.
async fn shard(
    State(state): State<PeerState>,
    Path(slot): Path<u32>,
    Query(q): Query<ShardQuery>,
    headers: HeaderMap,
) -> Response {
    let leader = match leader_of(&state) {
        Ok(leader) => leader,
        Err(refused) => return refused.into_response(),
    };
    // The leader may see a new holder a heartbeat after the holder sees itself:
    // until then the confirmation waits, re-checked on every coordination change.
    let mut view = state.shared.coordination_receiver();
    let mut unconfirmed = q.holder.as_deref();
    let confirm = |unconfirmed: &mut Option<&str>| {
        let Some(holder) = *unconfirmed else {
            return;
        };
        let view = state.shared.coordination();
        if leader::leading_term(&view) != Some(leader.term()) {
            return; // the term of this assignment is over: nothing to confirm in it
        }
        let live = view.live_slots.unwrap_or_default();
        if live.iter().any(|l| l.slot == slot && l.holder == holder) {
            leader.confirm(slot, holder, q.after_term, q.after);
            *unconfirmed = None;
        }
    };
    confirm(&mut unconfirmed);
    let deadline = Instant::now() + Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    let mut updates = leader.subscribe();
    loop {
        let snapshot = updates.borrow_and_update().clone();
        if let Some(snap) = &snapshot {
            if let Some(shard) = snap.shards.get(&slot) {
                if q.lags(snap.term, shard.generation, snap.generation) {
                    let stamp = [
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        ),
                        (TERM_HEADER, HeaderValue::from(snap.term)),
                        (GENERATION_HEADER, HeaderValue::from(shard.generation)),
                    ];
                    // As compressed once for every reader: the holder serves these
                    // very bytes. A holder of an earlier release gets the JSON.
                    if !accepts_gzip(&headers) {
                        return match shard.body.json() {
                            Ok(json) => (stamp, json).into_response(),
                            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                        };
                    }
                    let mut response = (stamp, shard.body.gzip().clone()).into_response();
                    response
                        .headers_mut()
                        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    return response;
                }
            }
        }
        if unconfirmed.is_some() {
            tokio::select! {
                changed = view.changed() => {
                    if changed.is_ok() {
                        confirm(&mut unconfirmed);
                    } else {
                        unconfirmed = None;
                    }
                    continue;
                }
                _ = updates.changed() => continue,
                _ = tokio::time::sleep_until(deadline.into()) => {}
                _ = state.stopping.cancelled() => return stopping(),
                _ = leader.ended() => return term_ended(),
            }
        }
        let wait = tokio::select! {
            wait = tokio::time::timeout_at(deadline.into(), updates.changed()) => wait,
            _ = state.stopping.cancelled() => return stopping(),
            _ = leader.ended() => return term_ended(),
        };
        match wait {
            Ok(Ok(())) => continue,
            // Leadership ended (the sender is gone) or the wait is over.
            Ok(Err(_)) => return term_ended(),
            Err(_) if snapshot.is_none() => {
                return (StatusCode::SERVICE_UNAVAILABLE, "no assignment yet\n").into_response()
            }
            Err(_) => return StatusCode::NOT_MODIFIED.into_response(),
        }
    }
}

/// The whole assignment for mirroring: immediately if newer than (`after_term`,
/// `after`), else when it changes or after `wait_ms` (304).
async fn snapshot(
    State(state): State<PeerState>,
    Query(q): Query<ShardQuery>,
    headers: HeaderMap,
) -> Response {
    // Replicas of earlier releases ask for no type: they get the JSON document.
    let encoded = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(SNAPSHOT_CONTENT_TYPE));
    let leader = match leader_of(&state) {
        Ok(leader) => leader,
        Err(refused) => return refused.into_response(),
    };
    let deadline = Instant::now() + Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    let mut updates = leader.subscribe();
    loop {
        if let Some(snap) = updates.borrow_and_update().clone() {
            if q.lags(snap.term, snap.generation, snap.generation) {
                if !encoded {
                    let Ok(json) = snap.legacy_json() else {
                        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                    };
                    return (
                        [(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        )],
                        json,
                    )
                        .into_response();
                }
                let chunks = futures::stream::iter(
                    snap.encode()
                        .into_iter()
                        .map(Ok::<_, std::convert::Infallible>),
                );
                return (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(SNAPSHOT_CONTENT_TYPE),
                    )],
                    axum::body::Body::from_stream(chunks),
                )
                    .into_response();
            }
        }
        let wait = tokio::select! {
            wait = tokio::time::timeout_at(deadline.into(), updates.changed()) => wait,
            _ = state.stopping.cancelled() => return stopping(),
            _ = leader.ended() => return term_ended(),
        };
        match wait {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return term_ended(),
            Err(_) => return StatusCode::NOT_MODIFIED.into_response(),
        }
    }
}

/// The leader's assignment: per slot its holder, target count and generation.
async fn assignment(State(state): State<PeerState>) -> Response {
    let leader = match leader_of(&state) {
        Ok(leader) => leader,
        Err(refused) => return refused.into_response(),
    };
    let view = state.shared.coordination();
    let live = view.live_slots.unwrap_or_default();
    let snap = leader.snapshot();
    let slots = leader
        .summary()
        .into_iter()
        .map(|s| {
            let holder = live.iter().find(|l| l.slot == s.slot);
            AssignedSlot {
                slot: s.slot,
                holder: holder.map(|h| h.holder.clone()),
                addr: holder.map(|h| h.addr.clone()),
                targets: s.targets,
                draining: s.draining,
                generation: s.generation,
                confirmed_generation: s.confirmed_generation,
                confirmed_holder: s.confirmed_holder,
            }
        })
        .collect();
    Json(AssignmentDoc {
        term: snap.as_ref().map(|s| s.term),
        generation: snap.as_ref().map(|s| s.generation),
        slots,
    })
    .into_response()
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
    let Some(published) = shared.targets() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "no complete discovery yet; see /v1/status\n",
        )
            .into_response();
    };
    // A shard of a slot this replica no longer serves is someone else's now (checked
    // at request time, so a replica resuming from a pause never serves it again).
    // A slot whose lease lapsed while nobody else took it is still served (stale).
    if let Some(stamp) = published.shard {
        let serving = shared.coordination().serving_slot();
        if stamp.slot.is_some() && stamp.slot != serving && !shared.is_draining() {
            return (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                "[]",
            )
                .into_response();
        }
    }
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
fn accepts_gzip(headers: &HeaderMap) -> bool {
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
    fn an_asker_is_answered_when_behind_or_ahead_of_what_was_published() {
        let q = |after_term, after| ShardQuery {
            after_term,
            after,
            wait_ms: 0,
            holder: None,
        };
        // The shard of slot k last changed at generation 4; the assignment is at 6.
        assert!(q(2, 3).lags(2, 4, 6), "an older generation");
        assert!(q(1, 9).lags(2, 4, 6), "an older term");
        assert!(!q(2, 4).lags(2, 4, 6), "up to date: wait");
        assert!(
            !q(2, 6).lags(2, 4, 6),
            "a later generation of the same shard"
        );
        assert!(
            q(2, 7).lags(2, 4, 6),
            "a generation never published in this term"
        );
        assert!(
            !q(3, 1).lags(2, 4, 6),
            "a later term: not this leader's to answer"
        );
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
        let shared = Shared::new("t".into(), "127.0.0.1:9001".into(), view, metrics);
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
