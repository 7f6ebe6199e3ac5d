//! waypost's cluster model: typed views of Kubernetes objects, immutable snapshots with change sets, and the sources that fill them.

pub mod convert;
pub mod model;
pub mod snapshot;
pub mod source;

pub use model::{Kind, Name, Object, ObjectKey};
pub use snapshot::{Changes, Snapshot, Store, Writer};
