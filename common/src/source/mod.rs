//! Sources that fill the cluster model: a state file, and (later) the Kubernetes API.

pub mod state_file;
