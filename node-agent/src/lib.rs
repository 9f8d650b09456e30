//! The node agent: the only writer of traffic redirection on a node.
//!
//! [`redirect`] turns a pod's options into the exact nftables ruleset and policy routes its
//! netns needs (a pure plan) and applies them in one atomic transaction.

#![forbid(unsafe_code)]

pub mod redirect;
