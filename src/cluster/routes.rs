//! The peer routes, for other replicas only: one router behind one
//! authentication layer (`PEER_TOKEN`), mounted on the peer listener
//! (`PEER_LISTEN_ADDR`). The leader answers [`CHANGES_PATH`] (the replication
//! stream), [`SHARD_PATH`] (one slot's `http_sd` shard, for replicas of earlier
//! releases) and [`ASSIGNMENT_PATH`]; any other replica answers 503. Handlers
//! only read the leader's published snapshot: they never wait for its next
//! computation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use super::assignment::Snapshot;
use super::leader::{self, LeaderHandle};
use super::protocol::{
    self, AssignedSlot, AssignmentDoc, ChangesQuery, ASSIGNMENT_PATH, CHANGES_CONTENT_TYPE,
    CHANGES_PATH, GENERATION_HEADER, MAX_WAIT, SHARD_PATH, TERM_HEADER,
};
use crate::state::Shared;

/// State of the peer routes.
#[derive(Clone)]
struct PeerState {
    shared: Arc<Shared>,
    /// Cancelled when the replica stops: long-polls end at once instead of holding
    /// the process past its stop timeout.
    stopping: CancellationToken,
}

/// The peer routes, behind one authentication layer.
pub fn router(
    shared: Arc<Shared>,
    peer_token: Option<String>,
    stopping: CancellationToken,
) -> Router {
    let token: Option<Arc<str>> = peer_token.map(Arc::from);
    Router::new()
        .route(CHANGES_PATH, get(changes))
        .route(SHARD_PATH, get(shard))
        .route(ASSIGNMENT_PATH, get(assignment))
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

/// Why a peer request gets no assignment.
#[derive(Debug)]
enum Refused {
    NotLeader,
    TermEnded,
    Stopping,
    NoAssignmentYet,
    /// Nothing newer within the wait.
    Unchanged,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let why = match self {
            Refused::Unchanged => return StatusCode::NOT_MODIFIED.into_response(),
            Refused::NotLeader => "not the leader\n",
            Refused::TermEnded => "no longer the leader\n",
            Refused::Stopping => "shutting down\n",
            Refused::NoAssignmentYet => "no assignment yet\n",
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

/// The leader's assignment, or 503 on a replica that does not lead now: fenced by
/// the term, so an assignment of a term that ended (the lease lapsed, or was
/// re-taken as a new term) is never served.
fn leader_of(state: &PeerState) -> Result<Arc<LeaderHandle>, Refused> {
    let leading = leader::leading_term(&state.shared.coordination());
    state
        .shared
        .leader()
        .filter(|h| !h.has_ended() && leading == Some(h.term()))
        .ok_or(Refused::NotLeader)
}

/// Waits until the leader's published snapshot is one `wanted` accepts (at once
/// if it is already), else until `q.wait_ms` passes (304). Asking with the
/// leader's term as `holder` of `slot` confirms (`after_term`, `after`),
/// ending handoffs to that slot, once the leader sees the asker holding it.
async fn wait_for(
    state: &PeerState,
    leader: &LeaderHandle,
    slot: Option<u32>,
    q: &ChangesQuery,
    wanted: impl Fn(&Snapshot) -> bool,
) -> Result<Arc<Snapshot>, Refused> {
    // The leader may see a new holder a heartbeat after the holder sees itself:
    // until then the confirmation waits, re-checked on every coordination change.
    let mut view = state.shared.coordination_receiver();
    let mut unconfirmed = q.holder.as_deref().zip(slot);
    let confirm = |unconfirmed: &mut Option<(&str, u32)>| {
        let Some((holder, slot)) = *unconfirmed else {
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
        if let Some(snap) = snapshot.as_ref().filter(|s| wanted(s)) {
            return Ok(snap.clone());
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
                _ = state.stopping.cancelled() => return Err(Refused::Stopping),
                _ = leader.ended() => return Err(Refused::TermEnded),
            }
        }
        let wait = tokio::select! {
            wait = tokio::time::timeout_at(deadline.into(), updates.changed()) => wait,
            _ = state.stopping.cancelled() => return Err(Refused::Stopping),
            _ = leader.ended() => return Err(Refused::TermEnded),
        };
        match wait {
            Ok(Ok(())) => continue,
            // Leadership ended (the sender is gone) or the wait is over.
            Ok(Err(_)) => return Err(Refused::TermEnded),
            Err(_) if snapshot.is_none() => return Err(Refused::NoAssignmentYet),
            Err(_) => return Err(Refused::Unchanged),
        }
    }
}

/// The changes after (`after_term`, `after`): the logged frames since, or one
/// whole frame when the asker is behind the log or of another term; at once if
/// there are any, else when the assignment changes or after `wait_ms` (304).
async fn changes(State(state): State<PeerState>, Query(q): Query<ChangesQuery>) -> Response {
    let leader = match leader_of(&state) {
        Ok(leader) => leader,
        Err(refused) => return refused.into_response(),
    };
    let lags = |s: &Snapshot| q.lags(s.term, s.generation, s.generation);
    let snap = match wait_for(&state, &leader, q.slot, &q, lags).await {
        Ok(snap) => snap,
        Err(refused) => return refused.into_response(),
    };
    let (after_term, after) = (q.after_term, q.after);
    // A whole frame is made once per generation, off the async workers.
    let made = tokio::task::spawn_blocking(move || {
        let (frames, whole) = snap.frames_after(after_term, after);
        protocol::encode_answer(snap.answer_head(whole), &frames)
    })
    .await;
    let Ok(chunks) = made else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let chunks = futures::stream::iter(chunks.into_iter().map(Ok::<_, std::convert::Infallible>));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(CHANGES_CONTENT_TYPE),
        )],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}

/// A slot's `http_sd` shard, for a holder of an earlier release: at once if
/// newer than (`after_term`, `after`), else when it changes or after `wait_ms`.
async fn shard(
    State(state): State<PeerState>,
    Path(slot): Path<u32>,
    Query(q): Query<ChangesQuery>,
    headers: HeaderMap,
) -> Response {
    let leader = match leader_of(&state) {
        Ok(leader) => leader,
        Err(refused) => return refused.into_response(),
    };
    let newer = |s: &Snapshot| {
        s.shards
            .get(&slot)
            .is_some_and(|shard| q.lags(s.term, shard.generation, s.generation))
    };
    let snap = match wait_for(&state, &leader, Some(slot), &q, newer).await {
        Ok(snap) => snap,
        Err(refused) => return refused.into_response(),
    };
    let Some(shard) = snap.shards.get(&slot).cloned() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let stamp = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (TERM_HEADER, HeaderValue::from(snap.term)),
        (GENERATION_HEADER, HeaderValue::from(shard.generation)),
    ];
    let rendered = tokio::task::spawn_blocking(move || shard.body().clone()).await;
    let Ok(body) = rendered else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if !crate::output::http::accepts_gzip(&headers) {
        return match body.json() {
            Ok(json) => (stamp, json).into_response(),
            Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        };
    }
    let mut response = (stamp, body.gzip().clone()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    response
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
        .iter()
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
                confirmed_holder: s.confirmed_holder.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_asker_is_answered_when_behind_or_ahead_of_what_was_published() {
        let q = |after_term, after| ChangesQuery {
            after_term,
            after,
            ..Default::default()
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
    fn only_the_peer_token_opens_the_peer_routes() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
            h
        };
        assert!(authorized(None, &HeaderMap::new()));
        assert!(!authorized(Some("s3cret"), &HeaderMap::new()));
        assert!(!authorized(Some("s3cret"), &with("Bearer s3cre")));
        assert!(!authorized(Some("s3cret"), &with("Basic s3cret")));
        assert!(authorized(Some("s3cret"), &with("Bearer s3cret")));
    }
}
