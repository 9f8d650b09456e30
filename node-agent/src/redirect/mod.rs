//! In-pod traffic redirection (SPEC §3): what to install, and installing it.
//!
//! [`plan`] is a pure function from [`Options`] to a [`Ruleset`] value, golden-tested as text.
//! [`Redirector`] writes a ruleset into a pod's netns as one nftables transaction over netlink
//! (so a pod is never half-redirected, and no process starts on its path) plus the policy route that returns app replies to ztunnel (over
//! rtnetlink), checks it for drift, and removes it.

mod apply;
pub mod host;
pub mod inspect;
mod nfnl;
mod plan;
mod route;

pub use apply::{ApplyError, Check, Redirector, check_nft};
pub use plan::{Options, Ruleset, TABLE, plan};
pub use route::RouteError;
