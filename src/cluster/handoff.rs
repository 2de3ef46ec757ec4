//! The SIGTERM drain of a slot holder: after releasing its slot it keeps serving
//! the slot's shard until someone else has confirmed those targets with the
//! leader, so that stopping a replica never leaves its targets unscraped.

use std::time::Duration;

use super::protocol::{AssignedSlot, AssignmentDoc, PeerClient};
use crate::coordination::lease::LeaseTable;
use crate::state::Shared;

impl AssignmentDoc {
    /// Whether the targets of `slot`, which `me` released, are served by someone
    /// else now: a new holder confirmed the slot's current shard, or the slot left
    /// the assignment (no standby took it) and every remaining slot's holder
    /// confirmed its current shard, the released targets included.
    pub fn handed_over(&self, slot: u32, me: &str) -> bool {
        match self.slots.iter().find(|s| s.slot == slot) {
            Some(assigned) => assigned.handed_over_from(me),
            None => {
                self.generation.is_some()
                    && !self.slots.is_empty()
                    && self.slots.iter().all(|s| {
                        s.holder.is_some()
                            && s.confirmed_holder == s.holder
                            && s.confirmed_generation >= s.generation
                    })
            }
        }
    }
}

impl AssignedSlot {
    /// Whether a holder other than `me` holds this slot and has confirmed its
    /// current shard: a stopping holder's targets are served by its successor.
    pub fn handed_over_from(&self, me: &str) -> bool {
        let holder = self.holder.as_deref().filter(|h| *h != me);
        holder.is_some()
            && self.confirmed_holder.as_deref() == holder
            && self.confirmed_generation >= self.generation
    }
}

/// After releasing `slot` on shutdown, waits until its new holder has confirmed
/// its shard with the leader (so the slot's targets are never unserved), at most
/// `limit` (what is left of the stop limit). The leader is looked up in the
/// lease table on every attempt: a stopping leader has just handed leadership
/// over too.
pub async fn drain(
    shared: &Shared,
    slot: u32,
    table: &LeaseTable,
    token: Option<&str>,
    limit: Duration,
) {
    if limit.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + limit;
    let client = PeerClient::new(token.map(str::to_owned)).ok();
    tracing::info!(
        slot,
        "released slot; serving its targets until the new holder has them (at most {limit:?})"
    );
    let leader_pk = table.leader_pk();
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let items = table.read(std::slice::from_ref(&leader_pk)).await.ok()?;
            let leader = items
                .get(&leader_pk)
                .filter(|l| !l.released && l.holder != shared.replica_id)?;
            let doc = client
                .as_ref()?
                .assignment(&leader.addr, Duration::from_secs(1))
                .await?;
            Some(doc.handed_over(slot, &shared.replica_id))
        };
        let handed = tokio::time::timeout_at(deadline, attempt).await;
        if handed == Ok(Some(true)) {
            tracing::info!(slot, "slot handed over");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tracing::info!(
        slot,
        "handoff not confirmed within {limit:?}; stopping anyway"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_slot_is_handed_over_only_once_someone_else_confirmed_its_targets() {
        let slot =
            |slot, holder: Option<&str>, generation, confirmed: Option<(&str, u64)>| AssignedSlot {
                slot,
                holder: holder.map(str::to_owned),
                addr: None,
                targets: 1,
                draining: 0,
                generation,
                confirmed_generation: confirmed.map_or(0, |c| c.1),
                confirmed_holder: confirmed.map(|c| c.0.to_owned()),
            };
        let doc = |slots| AssignmentDoc {
            term: Some(2),
            generation: Some(9),
            slots,
        };
        // Still confirmed by the stopping holder only, or taken but not confirmed.
        assert!(!doc(vec![slot(1, Some("me"), 5, Some(("me", 5)))]).handed_over(1, "me"));
        assert!(!doc(vec![slot(1, Some("new"), 5, Some(("me", 5)))]).handed_over(1, "me"));
        assert!(!doc(vec![slot(1, Some("new"), 5, Some(("new", 4)))]).handed_over(1, "me"));
        assert!(doc(vec![slot(1, Some("new"), 5, Some(("new", 5)))]).handed_over(1, "me"));
        // The slot left the assignment: every other slot must have confirmed.
        let others = vec![
            slot(0, Some("a"), 9, Some(("a", 9))),
            slot(2, Some("b"), 8, Some(("b", 7))),
        ];
        assert!(!doc(others.clone()).handed_over(1, "me"));
        let mut confirmed = others;
        confirmed[1].confirmed_generation = 8;
        assert!(doc(confirmed).handed_over(1, "me"));
        let empty = AssignmentDoc {
            term: None,
            generation: None,
            slots: vec![],
        };
        assert!(
            !empty.handed_over(1, "me"),
            "no assignment yet is no handover"
        );
    }
}
