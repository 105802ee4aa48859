//! Who is asking: TLS client certificates and HTTP Basic credentials turned into an
//! [`Identity`]. What that identity may obtain is the policy's business, not ours.

pub mod basic;
pub mod caps;
pub mod chain;
pub mod client_cert;
pub mod ra;

use std::fmt;

pub use basic::UserDb;
pub use chain::{Depth, Hierarchy, IssuanceIndex};
pub use client_cert::{CertIdentity, LabelTrust, TrustSet};

use rustls::pki_types::CertificateDer;

/// An authenticated client. At least one of the two is present.
#[derive(Clone, Debug)]
pub struct Identity {
    pub certificate: Option<CertIdentity>,
    pub user: Option<String>,
}

impl Identity {
    /// The client certificate's common name, if a certificate authenticated.
    pub fn cn(&self) -> Option<&str> {
        self.certificate
            .as_ref()
            .and_then(|c| c.subject.common_name())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.certificate, &self.user) {
            (Some(c), Some(u)) => write!(f, "{c} + user {u}"),
            (Some(c), None) => write!(f, "{c}"),
            (None, Some(u)) => write!(f, "user {u}"),
            (None, None) => f.write_str("anonymous"),
        }
    }
}

/// Which credentials a label accepts.
#[derive(Clone, Copy, Debug)]
pub struct AuthMethods {
    pub certificate: bool,
    pub basic: bool,
    pub require_both: bool,
    /// Grace window for expired client certificates (zero: none); see
    /// [`client_cert::verify_for_label`].
    pub grace_expired: std::time::Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("authentication required: present a client certificate or HTTP Basic credentials")]
    Missing,
    #[error("authentication required: this label needs both a client certificate and HTTP Basic credentials")]
    NeedBoth,
    #[error("authentication required: this label accepts only {0}")]
    MethodNotAccepted(&'static str),
    #[error("malformed HTTP Basic credentials")]
    MalformedBasic,
    #[error("wrong user name or password")]
    BadPassword,
    #[error("client certificate rejected: {0}")]
    Certificate(String),
    /// Too many failed authentications (from this address, or of this user): the password
    /// was not verified. Answered 429 with `Retry-After`.
    #[error("too many failed authentications: retry after {} s", crate::limits::retry_after_secs(*.0))]
    TooManyFailures(std::time::Duration),
}

/// The credentials a request carried: the TLS peer chain (leaf first) and the
/// `Authorization` header.
pub struct Credentials<'a> {
    pub peer_chain: Option<&'a [CertificateDer<'static>]>,
    /// What an earlier verification of this same `peer_chain` found, for the same trust, and
    /// still valid (the caller keeps it per connection): used instead of verifying again.
    pub peer_verified: Option<&'a CertIdentity>,
    pub authorization: Option<&'a [u8]>,
    /// Failed-authentication accounting for a password that needs verifying.
    pub attempts: std::sync::Arc<dyn basic::Attempts>,
}

/// Authenticates a request for a label. A presented credential that fails is an error even
/// if another one would succeed: a client that shows a bad certificate learns so.
pub async fn authenticate(
    methods: AuthMethods,
    trust: &LabelTrust<'_>,
    users: &UserDb,
    creds: Credentials<'_>,
) -> Result<Identity, AuthError> {
    let presented_cert = creds.peer_chain.filter(|c| !c.is_empty());
    let certificate = match (presented_cert, creds.peer_verified) {
        (Some(_), Some(verified)) if methods.certificate => Some(verified.clone()),
        (Some(chain), _) if methods.certificate => Some(
            client_cert::verify_for_label(
                chain,
                trust,
                std::time::SystemTime::now(),
                methods.grace_expired,
            )
            .map_err(AuthError::Certificate)?,
        ),
        _ => None,
    };
    let user = match creds.authorization {
        Some(header) if methods.basic => {
            let (user, password) = basic::parse_authorization(header)?;
            match users.verify(&user, &password, creds.attempts.clone()).await {
                Ok(true) => {}
                Ok(false) => return Err(AuthError::BadPassword),
                Err(wait) => return Err(AuthError::TooManyFailures(wait)),
            }
            Some(user)
        }
        _ => None,
    };
    if methods.require_both && (certificate.is_none() || user.is_none()) {
        return Err(AuthError::NeedBoth);
    }
    if certificate.is_none() && user.is_none() {
        return Err(match (methods.certificate, methods.basic) {
            (true, false) if creds.authorization.is_some() => {
                AuthError::MethodNotAccepted("client certificates")
            }
            (false, true) if presented_cert.is_some() => AuthError::MethodNotAccepted("HTTP Basic"),
            _ => AuthError::Missing,
        });
    }
    Ok(Identity { certificate, user })
}
