//! Integration tests: the real `waypost` binary, real UDP/TCP DNS, real state-file edits.

mod netns;
mod kube;
mod kube_support;
mod protocol;
mod records;
mod resolver;
mod reload;
mod support;
