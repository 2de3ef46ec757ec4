//! `shard-sd plan`: an offline what-if for operators. Reads an `http_sd` JSON
//! file (for example saved from `/prometheus-targets`), assigns its targets to N
//! slots and optionally to M, and reports balance and how many targets a change
//! of N would move, with the configured `SHARD_BY`, `REPLICATION_FACTOR` and
//! `BALANCE_TOLERANCE`.

use std::path::Path;

use serde::Serialize;

use crate::sharding::{self, Params, ShardBy, TargetAssignment};
use crate::targets::{self, Target};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read targets file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("targets file {path} is not http_sd JSON (a list of {{\"targets\": [...], \"labels\": {{...}}}}): {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("--slots and --to-slots must be at least 1")]
    NoSlots,
}

/// One side of the plan.
#[derive(Debug, Serialize, PartialEq)]
pub struct Side {
    pub slots: u32,
    /// Targets per slot, indexed by slot number.
    pub per_slot: Vec<usize>,
    pub max_over_mean: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Plan {
    pub targets: usize,
    pub shard_by: ShardBy,
    pub replication_factor: usize,
    pub balance_tolerance: f64,
    pub from: Side,
    pub to: Side,
    pub moved: usize,
    pub moved_fraction: f64,
    pub optimal_moved_fraction: f64,
}

/// Targets of an http_sd document (see [`targets::from_groups`]).
pub fn parse_targets(json: &[u8]) -> Result<Vec<Target>, serde_json::Error> {
    Ok(targets::from_groups(serde_json::from_slice(json)?))
}

fn side(assignment: &TargetAssignment, slots: u32) -> Side {
    let counts = assignment.per_slot();
    Side {
        slots,
        per_slot: (0..slots)
            .map(|s| counts.get(&s).copied().unwrap_or(0))
            .collect(),
        max_over_mean: sharding::max_over_mean(&counts, slots as usize),
    }
}

pub fn plan(
    targets: &[Target],
    from: u32,
    to: u32,
    by: ShardBy,
    params: &Params,
) -> Result<Plan, PlanError> {
    if from == 0 || to == 0 {
        return Err(PlanError::NoSlots);
    }
    let (before_slots, after_slots) = (sharding::equal_slots(from), sharding::equal_slots(to));
    let before = sharding::assign_targets(targets, &before_slots, by, params);
    let after = sharding::assign_targets(targets, &after_slots, by, params);
    let movement = sharding::movement(&before, &after);
    Ok(Plan {
        targets: targets.len(),
        shard_by: by,
        replication_factor: before.replicas,
        balance_tolerance: params.tolerance,
        from: side(&before, from),
        to: side(&after, to),
        moved: movement.moved,
        moved_fraction: movement.moved_fraction,
        optimal_moved_fraction: sharding::optimal_moved_fraction(&before_slots, &after_slots),
    })
}

/// Reads the file and plans.
pub fn plan_file(
    path: &Path,
    from: u32,
    to: u32,
    by: ShardBy,
    params: &Params,
) -> Result<Plan, PlanError> {
    let display = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| PlanError::Read {
        path: display.clone(),
        source,
    })?;
    let targets = parse_targets(&bytes).map_err(|source| PlanError::Parse {
        path: display,
        source,
    })?;
    plan(&targets, from, to, by, params)
}

/// The `plan` subcommand: the report as text, human or one JSON object.
pub fn report(
    path: &Path,
    from: u32,
    to: u32,
    by: ShardBy,
    params: &Params,
    json: bool,
) -> Result<String, PlanError> {
    let plan = plan_file(path, from, to, by, params)?;
    if json {
        // A struct of numbers and strings always serialises.
        Ok(serde_json::to_string_pretty(&plan).unwrap_or_default() + "\n")
    } else {
        Ok(plan.human())
    }
}

impl Plan {
    /// The report for people.
    pub fn human(&self) -> String {
        let side = |name: &str, s: &Side| {
            format!(
                "{name} {} slots: {} (max/mean {:.3})\n",
                s.slots,
                s.per_slot
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                s.max_over_mean
            )
        };
        let mut out = format!(
            "{} targets, by {:?}, replication factor {}, balance tolerance {}\n",
            self.targets, self.shard_by, self.replication_factor, self.balance_tolerance
        )
        .to_lowercase();
        out.push_str(&side("from", &self.from));
        out.push_str(&side("to  ", &self.to));
        out.push_str(&format!(
            "moved: {} targets ({:.1}%); optimum for fair shares: {:.1}%\n",
            self.moved,
            100.0 * self.moved_fraction,
            100.0 * self.optimal_moved_fraction
        ));
        out
    }
}
