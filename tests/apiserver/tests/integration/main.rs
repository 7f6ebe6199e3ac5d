//! Integration tests of the test API server, driven by the real kube-rs client and kubectl.

mod binary;
mod faults;
mod kubectl;
mod protocol;
mod support;
mod watcher;
