//! Test Kubernetes API server (being written).
