//! Printing errors for people, the same way in every program: each `Display` in this
//! workspace says one level and never repeats its source (hyper's rule), and [`Chain`] joins
//! the levels for logs and for the reasons that cross a boundary (the agent's answer to the
//! CNI plugin, which the runtime shows; a pod's pending reason in the agent's `/pods`).

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its sources: `a: b: c`.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_prints_every_level_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(Chain(&e).to_string(), "outer: inner");
    }
}
