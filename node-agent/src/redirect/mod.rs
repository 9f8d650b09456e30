//! In-pod traffic redirection (SPEC §3): what to install, and installing it.
//!
//! [`plan`] is a pure function from [`Options`] to a [`Ruleset`] value, golden-tested as text.
//! [`Redirector`] writes a ruleset into a pod's netns with one `nft -f` transaction (so a pod is
//! never half-redirected) plus the policy route that returns app replies to ztunnel (over
//! rtnetlink), checks it for drift, and removes it.

mod apply;
pub mod host;
pub mod inspect;
mod plan;
mod route;

pub use apply::{ApplyError, Check, Redirector, check_nft};
pub use plan::{Options, Ruleset, TABLE, plan};
pub use route::RouteError;
