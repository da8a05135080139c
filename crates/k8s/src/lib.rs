//! Kubernetes as a source for Sinew's control plane (`sinew control --kubernetes`).
//!
//! Kept in a crate of its own so the heavy Kubernetes code (kube-rs, k8s-openapi) is built
//! only by what needs it: the proxy never depends on it.
