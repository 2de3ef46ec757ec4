//! What a replica does when it is not the leader: follows the leader's changes
//! (one long-poll, answered within milliseconds of a new generation) into its
//! [`Mirror`] of the whole assignment and, as a slot holder, into its
//! [`OwnShard`], whose `http_sd` body it renders and serves; as a standby it
//! serves `[]`.
//!
//! Prefer duplicates over gaps: a shard is accepted only if its term is not older
//! than the highest term seen, and the last shard keeps being served while the
//! leader is unreachable or leadership changes hands, and while the slot's lease
//! lapsed without anybody else taking it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::mirror::{Mirror, OwnShard};
use super::protocol::{
    ChangesAnswer, ChangesHead, ChangesQuery, Frame, PeerClient, ProtocolError, ShardAnswer,
    ShardHead, LONG_POLL,
};
use crate::coordination::{CoordinationView, Role};
use crate::state::Shared;
use crate::targets::Body;

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

/// Waits until the poll target differs from `current`. The coordinator
/// notifies on every change, lease deadlines passing included.
async fn target_changed(view: &mut watch::Receiver<CoordinationView>, current: &Target) {
    loop {
        if view.changed().await.is_err() {
            // The coordinator is gone (shutting down): the caller's cancel ends it.
            std::future::pending::<()>().await;
        }
        if target_of(&view.borrow().at(Instant::now())) != *current {
            return;
        }
    }
}

/// A follower's state between polls.
struct Follower {
    shared: Arc<Shared>,
    client: PeerClient,
    highest_term: u64,
    table_term: u64,
    /// The typed shard of the slot served, as of the mirror's generation.
    own: Option<OwnShard>,
    /// The (slot, term, generation) of the mirror that the served shard is
    /// rendered from: the most a confirmation may claim.
    served: Option<(u32, u64, u64)>,
    /// A leader of an earlier release, without the replication stream.
    legacy: Option<LegacyLeader>,
    last_error: Option<String>,
}

/// A leader of an earlier release: its slot's shard is long-polled instead.
struct LegacyLeader {
    addr: String,
    /// The (slot, term, generation) received from it.
    have: Option<(u32, u64, u64)>,
}

/// Follows the leader for this replica's role until `cancel`.
pub async fn run(
    shared: Arc<Shared>,
    mut view: watch::Receiver<CoordinationView>,
    token: Option<String>,
    cancel: CancellationToken,
) {
    let client = match PeerClient::new(token) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let mut f = Follower {
        shared,
        client,
        highest_term: 0,
        table_term: 0,
        own: None,
        served: None,
        legacy: None,
        last_error: None,
    };
    loop {
        let current = view.borrow().at(Instant::now());
        let term = current.term.unwrap_or(0);
        if term < f.table_term {
            // The leader item's term went down (the table was reset): fence anew.
            tracing::warn!(
                term,
                table_term = f.table_term,
                "the leader term in the lease table went down"
            );
            f.highest_term = term;
            if f.shared.mirror().is_some_and(|m| m.term > term) {
                f.shared.set_mirror(None);
            }
        }
        f.table_term = term;
        f.highest_term = f.highest_term.max(term);
        let target = target_of(&current);
        // What this replica serves while it follows.
        let serving = match (current.role, current.slot) {
            (Role::Single, _) => return,
            // The leader task serves the leader's own slot and holds the assignment.
            (Role::Leader, _) => {
                f.own = None;
                f.served = None;
                None
            }
            (_, Some(slot)) => Some(slot),
            // The slot's lease lapsed and nobody else is known to hold it: keep its shard.
            (_, None) if current.stale_slot.is_some() => None,
            (_, None) => {
                f.own = None;
                f.served = None;
                f.shared
                    .publish_shard(None, f.highest_term, 0, Body::empty());
                None
            }
        };
        if let Some(slot) = serving {
            f.start_slot(slot);
        }
        let addr = match (current.role, current.leader_addr.clone()) {
            (Role::Follower | Role::Standby, Some(addr)) => addr,
            _ => {
                tokio::select! {
                    _ = target_changed(&mut view, &target) => continue,
                    _ = cancel.cancelled() => return,
                }
            }
        };
        let polled = tokio::select! {
            polled = f.poll(&addr, serving) => polled,
            _ = target_changed(&mut view, &target) => continue,
            _ = cancel.cancelled() => return,
        };
        if !polled {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = target_changed(&mut view, &target) => {}
                _ = cancel.cancelled() => return,
            }
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

impl Follower {
    /// Makes sure the typed shard of `slot` is there, in step with the mirror,
    /// and served. A slot just taken (or held since this replica led, or regained
    /// after its lease lapsed) is served from the mirror until the leader answers
    /// (it may be the one that is down), unless what is served for it is newer
    /// (from a leader of the earlier release); without a mirror, or while the
    /// slot is not in its membership, what is served for it stays, else `[]`.
    fn start_slot(&mut self, slot: u32) {
        let mirror = self.shared.mirror();
        let at = mirror.as_ref().map_or((0, 0), |m| (m.term, m.generation));
        if self.served == Some((slot, at.0, at.1)) {
            return;
        }
        let in_step = self
            .own
            .as_ref()
            .is_some_and(|o| o.slot == slot && o.at == at);
        if !in_step {
            self.served = None;
            let built = match &mirror {
                Some(m) => crate::cpu_bound(|| OwnShard::from_mirror(slot, m)),
                None => Ok(OwnShard::empty(slot)),
            };
            self.own = Some(built.unwrap_or_else(|err| {
                tracing::warn!(slot, "the mirrored assignment is unusable: {err}");
                self.shared.set_mirror(None);
                OwnShard::empty(slot)
            }));
        }
        // What is served for the slot already, as (term, generation).
        let stamp = self
            .shared
            .targets()
            .and_then(|p| p.shard)
            .filter(|stamp| stamp.slot == Some(slot) && stamp.term > 0)
            .map(|stamp| (stamp.term, stamp.generation));
        let head = mirror.as_ref().and_then(|m| m.shards.get(&slot));
        match head {
            Some(head) if at != (0, 0) && stamp.is_none_or(|s| s <= at) => {
                if !in_step {
                    tracing::info!(
                        slot,
                        term = at.0,
                        generation = at.1,
                        targets = head.targets,
                        "serving the slot from the mirrored assignment until the leader answers"
                    );
                }
                if let Err(err) = self.serve_own(at.0, at.1, head) {
                    tracing::warn!(slot, "the kept shard is not the leader's: {err}");
                }
            }
            None if stamp.is_none() => {
                self.shared.publish_shard(Some(slot), 0, 0, Body::empty());
            }
            _ => {}
        }
    }

    /// Serves the own shard as of (`term`, `generation`) of the mirror, if it is
    /// the shard `head` describes, and records it as what a confirmation may
    /// claim; else the reason it is not.
    fn serve_own(
        &mut self,
        term: u64,
        generation: u64,
        head: &ShardHead,
    ) -> Result<(), ProtocolError> {
        let Some(own) = self.own.as_ref() else {
            return Ok(());
        };
        let slot = own.slot;
        let body = crate::cpu_bound(|| own.body(head, self.shared.meta_labels))
            .inspect_err(|_| self.served = None)?;
        self.shared
            .publish_shard(Some(slot), term, head.generation, body);
        // Stopping: nothing replaces what is served, so nothing more is claimed.
        if !self.shared.is_draining() {
            self.served = Some((slot, term, generation));
        }
        Ok(())
    }

    /// One long-poll of the leader at `addr`. Returns `false` after a failure
    /// (the caller backs off).
    async fn poll(&mut self, addr: &str, serving: Option<u32>) -> bool {
        if self.legacy.as_ref().is_some_and(|l| l.addr == addr) {
            return match serving {
                Some(slot) => self.poll_legacy(addr, slot).await,
                // Nothing to serve, nothing to mirror from such a leader.
                None => {
                    tokio::time::sleep(LONG_POLL).await;
                    true
                }
            };
        }
        self.legacy = None;
        let mirror = self.shared.mirror();
        // The shard kept typed always follows the mirror (see `start_slot`).
        let after = mirror
            .as_ref()
            .filter(|m| !m.wants_whole())
            .map_or((0, 0), |m| (m.term, m.generation));
        // A holder confirms only the generation of the copy its served shard
        // is of: never more than it serves.
        let confirms = after != (0, 0)
            && serving.is_some_and(|slot| self.served == Some((slot, after.0, after.1)));
        let query = ChangesQuery {
            after_term: after.0,
            after: after.1,
            wait_ms: LONG_POLL.as_millis() as u64,
            holder: confirms.then(|| self.shared.replica_id.clone()),
            slot: serving.filter(|_| confirms),
        };
        match self.client.changes(addr, &query).await {
            ChangesAnswer::Changes {
                head,
                frames,
                received,
            } => {
                self.shared
                    .metrics
                    .peer_bytes_received
                    .inc_by(received as u64);
                if head.term < self.highest_term {
                    return self.failed(format!(
                        "ignored the changes of a deposed leader at {addr} (term {} < {})",
                        head.term, self.highest_term
                    ));
                }
                self.highest_term = head.term;
                match crate::cpu_bound(|| self.apply(mirror.as_deref(), serving, head, frames)) {
                    Ok(()) => {
                        if self.last_error.take().is_some() {
                            tracing::info!(leader = addr, "following the leader again");
                        }
                        // Received buffers and replaced shards are free now.
                        crate::release_free_memory();
                        true
                    }
                    Err(err) => {
                        // Start again from a whole copy; what is served stays.
                        self.shared.set_mirror(None);
                        if let Some(own) = &mut self.own {
                            *own = OwnShard::empty(own.slot);
                        }
                        self.served = None;
                        self.failed(format!("the changes from {addr} do not apply: {err}"))
                    }
                }
            }
            ChangesAnswer::Unchanged => {
                if let Some(m) = mirror.filter(|m| (m.term, m.generation) == after) {
                    m.confirm_current();
                }
                true
            }
            ChangesAnswer::NotSupported => {
                tracing::info!(
                    leader = addr,
                    "the leader is of an earlier release: following its shards instead"
                );
                self.legacy = Some(LegacyLeader {
                    addr: addr.to_owned(),
                    have: None,
                });
                true
            }
            ChangesAnswer::Failed(msg) => self.failed(msg),
        }
    }

    /// Applies an answer to the mirror and the served shard.
    fn apply(
        &mut self,
        held: Option<&Mirror>,
        serving: Option<u32>,
        head: ChangesHead,
        frames: Vec<Frame>,
    ) -> Result<(), ProtocolError> {
        // Elected meanwhile: the leader's work holds the assignment now.
        if self.shared.coordination().role == Role::Leader {
            return Ok(());
        }
        let whole = head.whole;
        let next = Mirror::followed(held, head, frames.clone())?;
        // Kept in step with the mirror even while its slot is not served (its
        // lease lapsed): it is served again as soon as the slot is.
        if let Some(own) = self.own.as_mut() {
            own.apply(whole, &frames)?;
            own.at = (next.term, next.generation);
        }
        let own_slot = self.own.as_ref().map(|o| o.slot);
        // A slot outside the leader's membership has nothing assigned (yet): what
        // is served for it stays.
        let head = serving
            .filter(|s| own_slot == Some(*s))
            .and_then(|s| next.shards.get(&s))
            .cloned();
        if let Some(head) = head {
            self.serve_own(next.term, next.generation, &head)?;
        }
        self.shared.set_mirror(Some(next));
        Ok(())
    }

    /// One long-poll of a leader of an earlier release for `slot`'s shard.
    async fn poll_legacy(&mut self, addr: &str, slot: u32) -> bool {
        let have = self
            .legacy
            .as_ref()
            .and_then(|l| l.have)
            .filter(|(s, _, _)| *s == slot);
        let after = have.map_or((0, 0), |(_, t, g)| (t, g));
        let query = ChangesQuery {
            after_term: after.0,
            after: after.1,
            wait_ms: LONG_POLL.as_millis() as u64,
            holder: Some(self.shared.replica_id.clone()),
            slot: None,
        };
        match self.client.shard(addr, slot, &query).await {
            ShardAnswer::Shard {
                term,
                generation,
                body,
                received,
            } if term >= self.highest_term => {
                self.shared
                    .metrics
                    .peer_bytes_received
                    .inc_by(received as u64);
                self.highest_term = term;
                let meta = self.shared.meta_labels;
                let body = crate::cpu_bound(|| body.with_meta_labels(meta));
                self.shared
                    .publish_shard(Some(slot), term, generation, body);
                if let Some(legacy) = &mut self.legacy {
                    legacy.have = Some((slot, term, generation));
                }
                crate::release_free_memory();
                true
            }
            ShardAnswer::Shard { term, .. } => self.failed(format!(
                "ignored a shard from a deposed leader at {addr} (term {term} < {})",
                self.highest_term
            )),
            ShardAnswer::Unchanged => true,
            ShardAnswer::Failed(msg) => self.failed(msg),
        }
    }

    /// Logs a failure once until it changes; returns `false`.
    fn failed(&mut self, msg: String) -> bool {
        if self.last_error.as_deref() != Some(&msg) {
            tracing::warn!("{msg}; serving the last shard meanwhile");
        }
        self.last_error = Some(msg);
        false
    }
}
