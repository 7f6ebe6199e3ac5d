//! A test Kubernetes API server that speaks the real list/watch protocol, with fault injection.
//!
//! It serves core v1 `services`, `pods`, `nodes`, `namespaces` and `discovery.k8s.io/v1`
//! `endpointslices` over plain HTTP/1.1, well enough for kube-rs's `watcher` and `kubectl`:
//! paginated lists, watches replayed from an event history, bookmarks, streaming lists
//! (`sendInitialEvents`), 410 Gone for expired resourceVersions, create/update/patch/delete,
//! and discovery. Tests drive state through the Rust API and break things through [`Faults`],
//! [`TestApiServer::new_epoch`] and [`TestApiServer::stop`] / [`TestApiServer::start_on`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), waypost_testapi::Error> {
//! use waypost_testapi::TestApiServer;
//! let api = TestApiServer::start("127.0.0.1:0".parse().unwrap()).await?;
//! api.create(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Service",
//!     "metadata": {"name": "web", "namespace": "default"},
//!     "spec": {"ports": [{"port": 80}]},
//! }))?;
//! api.write_kubeconfig("/tmp/kubeconfig")?;
//! api.faults().cut_watches();
//! # Ok(()) }
//! ```
//!
//! Scripts reach the same switches over HTTP: `POST /_test/fault/cut`,
//! `POST /_test/fault/fail?code=500[&count=N]` (no count: until cleared),
//! `POST /_test/fault/stall`, `POST /_test/fault/clear`, `POST /_test/fault/epoch`,
//! `POST /_test/fault/down?ms=2000` (listener down, then up again on the same port), and
//! `GET /_test/state`.
//!
//! Note for tests using kube 5: its client retries 429/503/504 by itself (up to 15 times
//! with backoff), so inject 500 or 410 to see an error quickly.

mod faults;
mod http;
mod resources;
mod selector;
mod server;
mod store;

pub use faults::Faults;
pub use resources::{RESOURCES, ResourceType, resolve};
pub use server::{Options, TestApiServer, parse_objects};

/// Errors of the Rust API; the HTTP side turns them into Kubernetes `Status` objects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address asked for.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No such object.
    #[error("{resource} \"{name}\" not found (namespace {namespace:?})")]
    NotFound {
        /// Plural resource name.
        resource: String,
        /// Namespace, empty for cluster-scoped objects.
        namespace: String,
        /// Object name.
        name: String,
    },
    /// Create of an object that exists.
    #[error("{resource} \"{name}\" already exists (namespace {namespace:?})")]
    AlreadyExists {
        /// Plural resource name.
        resource: String,
        /// Namespace, empty for cluster-scoped objects.
        namespace: String,
        /// Object name.
        name: String,
    },
    /// Update whose resourceVersion precondition failed.
    #[error(
        "Operation cannot be fulfilled on {resource} \"{name}\" (namespace {namespace:?}): {message}"
    )]
    Conflict {
        /// Plural resource name.
        resource: String,
        /// Namespace, empty for cluster-scoped objects.
        namespace: String,
        /// Object name.
        name: String,
        /// Why.
        message: String,
    },
    /// The object is not acceptable (HTTP 422).
    #[error("invalid object: {0}")]
    Invalid(String),
    /// The request is malformed (HTTP 400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The kind or resource name is not served here.
    #[error("unknown resource type {0:?}")]
    UnknownKind(String),
    /// The resourceVersion or continue token is older than the retained history (HTTP 410).
    #[error("{message}")]
    Expired {
        /// Message as the real server words it.
        message: String,
    },
    /// The resourceVersion asked for is newer than the server's (HTTP 504, as the real one).
    #[error("Too large resource version: {requested}, current: {current}")]
    TooLargeResourceVersion {
        /// resourceVersion asked for.
        requested: u64,
        /// The server's latest resourceVersion.
        current: u64,
    },
    /// A YAML/JSON object file could not be parsed.
    #[error("cannot parse objects")]
    Parse(#[source] serde_yaml::Error),
    /// Writing a file (kubeconfig) failed.
    #[error("cannot write {path}")]
    Write {
        /// File written.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// HTTP status code the real API server uses for this error.
    pub fn code(&self) -> u16 {
        match self {
            Error::NotFound { .. } | Error::UnknownKind(_) => 404,
            Error::AlreadyExists { .. } | Error::Conflict { .. } => 409,
            Error::Invalid(_) => 422,
            Error::BadRequest(_) | Error::Parse(_) => 400,
            Error::Expired { .. } => 410,
            Error::TooLargeResourceVersion { .. } => 504,
            Error::Bind { .. } | Error::Write { .. } => 500,
        }
    }

    /// `Status.reason` the real API server uses for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NotFound { .. } | Error::UnknownKind(_) => "NotFound",
            Error::AlreadyExists { .. } => "AlreadyExists",
            Error::Conflict { .. } => "Conflict",
            Error::Invalid(_) => "Invalid",
            Error::BadRequest(_) | Error::Parse(_) => "BadRequest",
            Error::Expired { .. } => "Expired",
            Error::TooLargeResourceVersion { .. } => "Timeout",
            Error::Bind { .. } | Error::Write { .. } => "InternalError",
        }
    }

    /// Whether this is a 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    /// Whether this is a 409 (already exists or stale resourceVersion).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::AlreadyExists { .. } | Error::Conflict { .. })
    }

    /// Whether this is a 410 Gone.
    pub fn is_expired(&self) -> bool {
        matches!(self, Error::Expired { .. })
    }
}
