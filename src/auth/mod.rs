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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine;

    use super::client_cert::tests::{ca, set, valid_leaf};
    use super::*;

    fn methods(certificate: bool, basic: bool, require_both: bool) -> AuthMethods {
        AuthMethods {
            certificate,
            basic,
            require_both,
            grace_expired: Duration::ZERO,
        }
    }

    fn basic(user: &str, password: &str) -> Vec<u8> {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {encoded}").into_bytes()
    }

    async fn attempt(
        methods: AuthMethods,
        trust: &LabelTrust<'_>,
        users: &UserDb,
        chain: Option<&[CertificateDer<'static>]>,
        header: Option<&[u8]>,
    ) -> Result<Identity, AuthError> {
        let creds = Credentials {
            peer_chain: chain,
            peer_verified: None,
            authorization: header,
            attempts: Arc::new(basic::Unlimited),
        };
        authenticate(methods, trust, users, creds).await
    }

    /// Which credentials a label takes, and what it answers each combination with: a
    /// credential a label does not accept never authenticates, and a presented credential that
    /// fails is refused even when another one would pass.
    #[tokio::test]
    async fn each_label_accepts_only_its_methods_and_every_presented_credential_counts() {
        let issuing = ca("plant issuing CA", Some(0), None, None);
        let stranger = ca("another plant's CA", Some(0), None, None);
        let device = vec![valid_leaf("dev-1", &issuing)];
        let forged = vec![valid_leaf("dev-1", &stranger)];
        let sets = [set("devices", &issuing, Depth::Direct)];
        let trust = LabelTrust {
            sets: &sets,
            ..LabelTrust::default()
        };
        let mut users = BTreeMap::new();
        users.insert("estuser".to_owned(), basic::hash_password("right").unwrap());
        let users = UserDb::new(&users, 1).unwrap();
        let good = basic("estuser", "right");
        let wrong = basic("estuser", "wrong");

        macro_rules! auth {
            ($m:expr, $chain:expr, $header:expr) => {
                attempt($m, &trust, &users, $chain, $header)
            };
        }
        let cert_only = methods(true, false, false);
        let basic_only = methods(false, true, false);
        let either = methods(true, true, false);
        let both = methods(true, true, true);

        // Certificates only.
        let id = auth!(cert_only, Some(&device), None).await.unwrap();
        assert_eq!(id.cn(), Some("dev-1"));
        assert!(id.user.is_none());
        assert_eq!(id.to_string(), "certificate \"CN=dev-1\" (devices)");
        let e = auth!(cert_only, Some(&forged), None).await.unwrap_err();
        assert_eq!(
            e,
            AuthError::Certificate("not issued by a CA this label trusts".into())
        );
        assert_eq!(
            auth!(cert_only, None, Some(&good)).await.unwrap_err(),
            AuthError::MethodNotAccepted("client certificates")
        );
        assert_eq!(
            auth!(cert_only, None, None).await.unwrap_err(),
            AuthError::Missing
        );
        // An empty chain is no certificate.
        assert_eq!(
            auth!(cert_only, Some(&[]), None).await.unwrap_err(),
            AuthError::Missing
        );

        // HTTP Basic only.
        let id = auth!(basic_only, None, Some(&good)).await.unwrap();
        assert_eq!(id.user.as_deref(), Some("estuser"));
        assert_eq!(id.cn(), None);
        assert_eq!(id.to_string(), "user estuser");
        assert_eq!(
            auth!(basic_only, None, Some(&wrong)).await.unwrap_err(),
            AuthError::BadPassword
        );
        assert_eq!(
            auth!(basic_only, Some(&device), None).await.unwrap_err(),
            AuthError::MethodNotAccepted("HTTP Basic")
        );
        assert_eq!(
            auth!(basic_only, None, None).await.unwrap_err(),
            AuthError::Missing
        );
        // A certificate alongside is not looked at.
        let id = auth!(basic_only, Some(&forged), Some(&good)).await.unwrap();
        assert!(id.certificate.is_none());

        // Either: one is enough, a failing one is refused whatever the other.
        let id = auth!(either, Some(&device), None).await.unwrap();
        assert_eq!(id.cn(), Some("dev-1"));
        let id = auth!(either, None, Some(&good)).await.unwrap();
        assert_eq!(id.user.as_deref(), Some("estuser"));
        assert_eq!(
            auth!(either, Some(&device), Some(&wrong))
                .await
                .unwrap_err(),
            AuthError::BadPassword
        );
        assert!(matches!(
            auth!(either, Some(&forged), Some(&good)).await.unwrap_err(),
            AuthError::Certificate(_)
        ));
        assert_eq!(
            auth!(either, None, None).await.unwrap_err(),
            AuthError::Missing
        );

        // Both required.
        assert_eq!(
            auth!(both, Some(&device), None).await.unwrap_err(),
            AuthError::NeedBoth
        );
        assert_eq!(
            auth!(both, None, Some(&good)).await.unwrap_err(),
            AuthError::NeedBoth
        );
        let id = auth!(both, Some(&device), Some(&good)).await.unwrap();
        assert_eq!(
            id.to_string(),
            "certificate \"CN=dev-1\" (devices) + user estuser"
        );
        assert_eq!(
            Identity {
                certificate: None,
                user: None
            }
            .to_string(),
            "anonymous"
        );
    }

    /// What an earlier verification of the connection's chain found is used as it is, on a
    /// label that takes certificates; on a label that does not, it authenticates nothing.
    #[tokio::test]
    async fn an_earlier_verification_counts_only_where_certificates_do() {
        let issuing = ca("plant issuing CA", Some(0), None, None);
        let device = vec![valid_leaf("dev-1", &issuing)];
        let sets = [set("devices", &issuing, Depth::Direct)];
        let trust = LabelTrust {
            sets: &sets,
            ..LabelTrust::default()
        };
        let mut earlier =
            client_cert::verify(&device, &sets, &[], std::time::SystemTime::now()).unwrap();
        earlier.trust = "verified earlier".into();
        let users = UserDb::new(&BTreeMap::new(), 1).unwrap();
        let auth = |m: AuthMethods| {
            authenticate(
                m,
                &trust,
                &users,
                Credentials {
                    peer_chain: Some(&device),
                    peer_verified: Some(&earlier),
                    authorization: None,
                    attempts: Arc::new(basic::Unlimited),
                },
            )
        };
        let id = auth(methods(true, false, false)).await.unwrap();
        assert_eq!(id.certificate.unwrap().trust, "verified earlier");
        assert_eq!(
            auth(methods(false, true, false)).await.unwrap_err(),
            AuthError::MethodNotAccepted("HTTP Basic")
        );
    }
}
