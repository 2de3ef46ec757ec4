//! Outputs: how the published target list reaches collectors. Both read the
//! same pre-rendered bytes from [`crate::state::Shared`].
//!
//! - [`http`]: the `http_sd` endpoint plus health and status endpoints;
//! - [`file`]: the `file_sd` file of `FILE_BASED` mode, written atomically;
//! - [`serve`]: the server loop of both listeners, with its limits.

pub mod file;
pub mod http;
pub mod serve;
