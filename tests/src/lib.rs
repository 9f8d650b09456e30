//! End-to-end tests of the node's programs against the real kernel: each file in `tests/`
//! builds simulated nodes and pods with `mesh-testbed`, runs the real binaries in them and
//! checks what crosses the wire. This library is empty on purpose; fixtures live in
//! `mesh-testbed` so benchmarks and the local mesh share them.

#![forbid(unsafe_code)]
