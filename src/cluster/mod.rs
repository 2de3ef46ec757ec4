//! Sharded serving: everything a replica does with a lease table besides
//! discovery. The elected [`leader`] assigns the discovered targets to the live
//! slots ([`assignment`], a pure state machine) and logs each change; every other
//! replica follows that log ([`follower`]) into its [`mirror`] of the whole
//! assignment and renders its own slot's shard from it; [`protocol`] owns both
//! ends of the peer wire and [`routes`] its server side; [`handoff`] keeps a
//! stopping replica's slot served until its successor has it.
//!
//! Data flows one way: discovery → leader → assignment → log → followers →
//! their served shard. Nothing on the peer path is `http_sd` JSON.

pub mod assignment;
pub mod follower;
pub mod handoff;
pub mod leader;
pub mod mirror;
pub mod protocol;
pub mod routes;
