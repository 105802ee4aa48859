//! Issuing: a [`Grant`](crate::policy::Grant) and a [`Profile`] become a certificate. The
//! local backend signs with a delegated intermediate held by this instance.

pub mod backend;
pub mod delegation;
pub mod fallback;
pub mod health;
pub mod local;
pub mod path;
pub mod profile;
mod store;
pub mod upstream;

pub use backend::{Backend, Deadline, Issuance, IssueRequest};
pub use local::LocalIssuer;
pub use profile::Profile;
pub use upstream::{CacertsCache, Upstream, UpstreamError};

use time::OffsetDateTime;

/// A certificate just issued, with what the journal records of it.
#[derive(Clone, Debug)]
pub struct Issued {
    pub der: Vec<u8>,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the subject cannot be encoded: {0}")]
    Subject(String),
    #[error("a subjectAltName cannot be encoded: {0}")]
    San(String),
    #[error("the issuer's certificate expires before the certificate could start")]
    IssuerExpired,
    #[error("signing failed: {0}")]
    Sign(String),
}
