//! waypost's DNS: an index of ready-to-send answers built from cluster snapshots, and the server that answers from it.

pub mod cache;
pub mod index;
pub mod metrics;
pub mod resolver;
pub mod server;
pub mod upstream;
pub mod wire;

pub use index::{Index, IndexBuilder, IndexConfig, PodRecords};
pub use server::{Handler, SharedIndex};
