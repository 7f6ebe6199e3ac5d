//! Sources that fill the cluster model: a state file, and the Kubernetes API.

pub mod kube;
pub mod state_file;
