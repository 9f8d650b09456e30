//! The Kubernetes pod source (arrives with the Kubernetes watch).
