//! In-pod traffic redirection (SPEC §3): what to install, and installing it.
//!
//! [`plan`] is a pure function from [`Options`] to a [`Ruleset`] value, golden-tested as text.
//! [`apply`] writes a ruleset into a pod's netns with one `nft -f` transaction (so a pod is
//! never half-redirected) plus the policy route that returns app replies to ztunnel.

mod apply;
mod plan;

pub use apply::{ApplyError, apply, remove};
pub use plan::{Options, Ruleset, TABLE, plan};
