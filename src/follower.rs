//! What a replica serves when it is not the leader: as a slot holder, its slot's
//! shard, fetched from the leader by long-poll (a new generation arrives within
//! milliseconds); as a standby, `[]`. A shard is accepted only if its term is not
//! older than the highest term seen, and the last shard keeps being served while
//! the leader is unreachable or leadership changes hands, and while the slot's
//! lease lapsed without anybody else taking it (prefer duplicates over gaps).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderName;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::assignment::{Snapshot, SNAPSHOT_CONTENT_TYPE};
use crate::coordination::{CoordinationView, Role};
use crate::state::{Mirror, Shared};
use crate::targets::Body;

/// Headers of a shard response.
pub const TERM_HEADER: HeaderName = HeaderName::from_static("x-shard-term");
pub const GENERATION_HEADER: HeaderName = HeaderName::from_static("x-shard-generation");

/// How long the leader holds a long-poll open.
pub const LONG_POLL: Duration = Duration::from_secs(20);

/// The most bytes a leader's answer may have: far above any assignment's
/// compressed size (about 45 bytes a target), far below what would hurt.
pub const MAX_PEER_BYTES: usize = 1 << 30;

/// A peer's answer body, refused past [`MAX_PEER_BYTES`].
async fn read_capped(mut resp: reqwest::Response) -> Result<bytes::Bytes, String> {
    let too_large = || format!("answer larger than {MAX_PEER_BYTES} bytes");
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_PEER_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > MAX_PEER_BYTES {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// What a change of which restarts the poll. The term is part of it: a leader
/// that re-took its own lease is at the same address, in a new term.
#[derive(Clone, Debug, PartialEq)]
struct Target {
    role: Role,
    slot: Option<u32>,
    stale_slot: Option<u32>,
    leader_addr: Option<String>,
    term: Option<u64>,
}

fn target_of(view: &CoordinationView) -> Target {
    Target {
        role: view.role,
        slot: view.slot,
        stale_slot: view.stale_slot,
        leader_addr: view.leader_addr.clone(),
        term: view.term,
    }
}

/// Waits until the poll target differs from `current` (checked at least every 250 ms,
/// since a renew deadline can pass without the view changing).
async fn target_changed(view: &mut watch::Receiver<CoordinationView>, current: &Target) {
    loop {
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(250), view.changed()).await {
            // The coordinator is gone (shutting down): do not spin.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if target_of(&view.borrow().at(Instant::now())) != *current {
            return;
        }
    }
}

enum Poll {
    Shard {
        term: u64,
        generation: u64,
        body: Body,
        /// Bytes received.
        received: usize,
    },
    Unchanged,
    Failed(String),
}

async fn poll(
    client: &reqwest::Client,
    addr: &str,
    slot: u32,
    holder: &str,
    after: (u64, u64),
    token: Option<&str>,
) -> Poll {
    let url = format!("http://{addr}/v1/shards/{slot}");
    let query = [
        ("holder", holder.to_owned()),
        ("after_term", after.0.to_string()),
        ("after", after.1.to_string()),
        ("wait_ms", LONG_POLL.as_millis().to_string()),
    ];
    let mut req = client
        .get(&url)
        .query(&query)
        .header(reqwest::header::ACCEPT_ENCODING, "gzip")
        .timeout(LONG_POLL + Duration::from_secs(5));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Poll::Failed(format!("cannot reach leader at {addr}: {e}")),
    };
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_MODIFIED {
        return Poll::Unchanged;
    }
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Poll::Failed(format!(
            "leader at {addr} answered {status}: {}",
            text.trim()
        ));
    }
    let header = |name: &HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let (Some(term), Some(generation)) = (header(&TERM_HEADER), header(&GENERATION_HEADER)) else {
        return Poll::Failed(format!(
            "leader at {addr} sent a shard without term and generation"
        ));
    };
    // Compressed unless the leader is of an earlier release.
    let gzip = resp
        .headers()
        .get(reqwest::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let bytes = match read_capped(resp).await {
        Ok(bytes) => bytes,
        Err(e) => return Poll::Failed(format!("reading shard from {addr}: {e}")),
    };
    let received = bytes.len();
    // Checked before it replaces what is served: bad bytes never do.
    let checked = tokio::task::spawn_blocking(move || match gzip {
        true => Body::from_gzip(bytes),
        false => Body::from_json_checked(&bytes),
    })
    .await;
    match checked {
        Ok(Ok(body)) => Poll::Shard {
            term,
            generation,
            body,
            received,
        },
        Ok(Err(e)) => Poll::Failed(format!("leader at {addr} sent an invalid shard: {e}")),
        Err(e) => Poll::Failed(format!("checking the shard from {addr}: {e}")),
    }
}

/// Serves the right shard for this replica's role until `cancel`.
pub async fn run(
    shared: Arc<Shared>,
    mut view: watch::Receiver<CoordinationView>,
    token: Option<String>,
    cancel: CancellationToken,
) {
    let client = match reqwest::Client::builder().no_proxy().build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot build the HTTP client for the leader: {e}");
            return;
        }
    };
    let mut highest_term = 0u64;
    let mut table_term = 0u64;
    // (slot, term, generation) of the shard served.
    let mut have: Option<(u32, u64, u64)> = None;
    let mut last_error: Option<String> = None;
    loop {
        let current = view.borrow().at(Instant::now());
        let term = current.term.unwrap_or(0);
        if term < table_term {
            // The leader item's term went down (the table was reset): fence anew.
            tracing::warn!(
                term,
                table_term,
                "the leader term in the lease table went down"
            );
            highest_term = term;
        }
        table_term = term;
        highest_term = highest_term.max(term);
        let target = target_of(&current);
        let wait_for_change = match (current.role, current.slot, current.leader_addr.as_deref()) {
            (Role::Single, _, _) => return,
            // The leader task serves the leader's own slot.
            (Role::Leader, _, _) => true,
            // The slot's lease lapsed and nobody else is known to hold it: keep its shard.
            (_, None, _) if current.stale_slot.is_some() => true,
            (Role::Standby, _, _) | (_, None, _) => {
                have = None;
                shared.publish_shard(None, highest_term, 0, Body::empty());
                true
            }
            (Role::Follower, Some(slot), Some(addr)) => {
                if have.is_none_or(|(s, _, _)| s != slot) {
                    // A slot just taken (or held since this replica led): keep what is
                    // served for it, else serve it from the mirrored assignment until
                    // the leader answers (it may be the one that is down), else `[]`.
                    have = start_slot(&shared, slot);
                }
                let after = have.map_or((0, 0), |(_, t, g)| (t, g));
                let result = tokio::select! {
                    r = poll(&client, addr, slot, &shared.replica_id, after, token.as_deref()) => r,
                    _ = target_changed(&mut view, &target) => continue,
                    _ = cancel.cancelled() => return,
                };
                match result {
                    Poll::Shard {
                        term,
                        generation,
                        body,
                        received,
                    } if term >= highest_term => {
                        shared.metrics.peer_bytes_received.inc_by(received as u64);
                        highest_term = term;
                        have = Some((slot, term, generation));
                        shared.publish_shard(Some(slot), term, generation, body);
                        // The received buffer and the shard it replaced are free now.
                        crate::release_free_memory();
                        if last_error.take().is_some() {
                            tracing::info!(leader = addr, "receiving shards from the leader again");
                        }
                        false
                    }
                    Poll::Shard { term, .. } => {
                        tracing::warn!(
                            term,
                            highest_term,
                            leader = addr,
                            "ignored a shard from a deposed leader"
                        );
                        sleep_or_change(&mut view, &target, &cancel).await
                    }
                    Poll::Unchanged => false,
                    Poll::Failed(msg) => {
                        if last_error.as_deref() != Some(&msg) {
                            tracing::warn!("{msg}; serving the last shard meanwhile");
                        }
                        last_error = Some(msg);
                        sleep_or_change(&mut view, &target, &cancel).await
                    }
                }
            }
            (Role::Follower, Some(_), None) => true,
        };
        if wait_for_change {
            tokio::select! {
                _ = target_changed(&mut view, &target) => {}
                _ = cancel.cancelled() => return,
            }
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

/// Keeps a copy of the leader's whole assignment (see [`Shared::mirror`]) so that,
/// if this replica is elected, it publishes at once instead of after its first
/// discovery cycle. Costs one long-poll per replica, answered on each change.
pub async fn mirror(
    shared: Arc<Shared>,
    mut view: watch::Receiver<CoordinationView>,
    token: Option<String>,
    cancel: CancellationToken,
) {
    let Ok(client) = reqwest::Client::builder().no_proxy().build() else {
        return;
    };
    loop {
        let current = view.borrow().at(Instant::now());
        let target = target_of(&current);
        // After the copy held: none (taken by this replica's own term, say) asks
        // for the whole assignment at once.
        let mut after = shared.mirror().map_or((0, 0), |m| (m.term, m.generation));
        let term = current.term.unwrap_or(0);
        if after.0 > term {
            // The leader term in the lease table went down (the table was reset).
            after = (0, 0);
        }
        let addr = match (current.role, current.leader_addr.as_deref()) {
            (Role::Single, _) => return,
            (Role::Follower | Role::Standby, Some(addr)) => addr.to_owned(),
            _ => {
                tokio::select! {
                    _ = target_changed(&mut view, &target) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        let url = format!(
            "http://{addr}/v1/snapshot?after_term={}&after={}&wait_ms={}",
            after.0,
            after.1,
            LONG_POLL.as_millis()
        );
        let mut req = client
            .get(url)
            .header(reqwest::header::ACCEPT, SNAPSHOT_CONTENT_TYPE)
            .timeout(LONG_POLL + Duration::from_secs(5));
        if let Some(token) = token.as_deref() {
            req = req.bearer_auth(token);
        }
        let fetched = async {
            let resp = req.send().await.ok()?;
            if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
                return Some(None);
            }
            if !resp.status().is_success() {
                return None;
            }
            // A leader of an earlier release sends the JSON document.
            let encoded = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes() == SNAPSHOT_CONTENT_TYPE.as_bytes());
            let body = read_capped(resp).await.ok()?;
            shared.metrics.peer_bytes_received.inc_by(body.len() as u64);
            let decoded = tokio::task::spawn_blocking(move || match encoded {
                true => Snapshot::decode(&body),
                false => Snapshot::decode_legacy(&body),
            });
            decoded.await.ok().map(Some)
        };
        let answer = tokio::select! {
            answer = fetched => answer,
            _ = target_changed(&mut view, &target) => continue,
            _ = cancel.cancelled() => return,
        };
        match answer {
            // Newer, or another generation of the same term (the leader answers at
            // once only a copy it did not publish).
            Some(Some(Ok(doc)))
                if (doc.term > after.0 || (doc.term == after.0 && doc.generation != after.1))
                    && doc.term >= term =>
            {
                shared.set_mirror(Mirror::mirrored(doc));
                crate::release_free_memory();
                continue;
            }
            Some(Some(Err(err))) => tracing::warn!("the leader's assignment is invalid: {err}"),
            // Nothing changed since the copy held: it is current.
            Some(None) => {
                if let Some(m) = shared.mirror().filter(|m| (m.term, m.generation) == after) {
                    m.confirm_current();
                }
            }
            // An error, or a deposed leader.
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// What this replica serves for `slot`, which it holds and has no shard of from
/// the leader yet: the shard it already serves for that slot (it held the slot
/// while leading, or regained it after a lapse), else the slot's shard in the
/// newest mirrored assignment (whatever its term: a copy is better than
/// nothing), else `[]`. Returns the (slot, term, generation) served, to poll the
/// leader after.
fn start_slot(shared: &Shared, slot: u32) -> Option<(u32, u64, u64)> {
    let served = shared
        .targets()
        .and_then(|p| p.shard)
        .filter(|stamp| stamp.slot == Some(slot) && stamp.term > 0);
    if let Some(stamp) = served {
        return Some((slot, stamp.term, stamp.generation));
    }
    let mirror = shared.mirror();
    let mirrored = mirror.as_ref().and_then(|m| {
        let shard = m.shards.get(&slot)?;
        match crate::cpu_bound(|| shard.checked()) {
            Ok(body) => Some((m, body)),
            Err(err) => {
                tracing::warn!(
                    slot,
                    "the mirrored shard of the new slot is unusable: {err}"
                );
                None
            }
        }
    });
    match mirrored {
        Some((mirror, body)) => {
            tracing::info!(
                slot,
                term = mirror.term,
                generation = mirror.generation,
                targets = body.targets(),
                "serving the new slot from the mirrored assignment until the leader answers"
            );
            shared.publish_shard(Some(slot), mirror.term, mirror.generation, body);
            Some((slot, mirror.term, mirror.generation))
        }
        None => {
            shared.publish_shard(Some(slot), 0, 0, Body::empty());
            None
        }
    }
}

/// Backs off after a failed poll, waking early when the leader or slot changes.
/// Returns `false`: the caller polls again at once afterwards.
async fn sleep_or_change(
    view: &mut watch::Receiver<CoordinationView>,
    target: &Target,
    cancel: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        _ = target_changed(view, target) => {}
        _ = cancel.cancelled() => {}
    }
    false
}
