//! Client certificate validation, per label.
//!
//! The TLS layer only checks that the client holds the key of the certificate it presents
//! (see `transport::tls`); the chain is validated here, against the trust sets of the label
//! the request is for. That gives each label its own anchors and gives clients an HTTP answer
//! that says what was wrong instead of a bare TLS alert.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::time::OffsetDateTime;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::*;

use crate::est::{SanEntry, Subject};

/// A named set of trust anchors for client certificates.
pub struct TrustSet {
    pub name: String,
    anchors: Vec<TrustAnchor<'static>>,
    /// Only certificates issued directly by an anchor count. For the CA this server issues
    /// from: below it sit the Edge CAs of devices, and their module certificates must not
    /// pass for device identities.
    direct_only: bool,
}

impl TrustSet {
    pub fn new(name: &str, certificates: &[CertificateDer<'static>]) -> Result<TrustSet, String> {
        let anchors = certificates
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("trust set {name}: unusable CA certificate: {e:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if anchors.is_empty() {
            return Err(format!("trust set {name} holds no certificate"));
        }
        Ok(TrustSet {
            name: name.to_owned(),
            anchors,
            direct_only: false,
        })
    }

    /// A set that accepts only certificates issued directly by its anchors.
    pub fn direct(
        name: &str,
        certificates: &[CertificateDer<'static>],
    ) -> Result<TrustSet, String> {
        let mut set = Self::new(name, certificates)?;
        set.direct_only = true;
        Ok(set)
    }
}

/// An extra check on a verified path (see `TrustSet::direct_only`).
type PathCheck<'a> = dyn Fn(&webpki::VerifiedPath<'_>) -> Result<(), webpki::Error> + 'a;

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug)]
pub struct CertIdentity {
    pub subject: Subject,
    pub sans: Vec<SanEntry>,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_after: OffsetDateTime,
    /// The trust set that vouched for it.
    pub trust: String,
    /// Whether it is a CA certificate (basicConstraints CA:TRUE).
    pub ca: bool,
    /// It had expired, and was accepted within the label's grace window: it may only renew
    /// its own subject and subjectAltNames (see `policy`).
    pub grace: bool,
    /// The earliest notAfter on the verified path (the leaf's or an intermediate's): the
    /// verification holds until then, for the same trust sets.
    pub valid_until: OffsetDateTime,
}

impl fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "certificate \"{}\" ({})", self.subject, self.trust)
    }
}

/// Validates a presented chain (leaf first) for client authentication against the label's
/// trust sets, with `known_intermediates` standing in for a chain the client did not send
/// (IoT Edge often presents the leaf alone).
pub fn verify(
    chain: &[CertificateDer<'static>],
    trust: &[Arc<TrustSet>],
    known_intermediates: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<CertIdentity, String> {
    verify_with_grace(chain, trust, known_intermediates, now, Duration::ZERO)
}

/// [`verify`], with a grace window for an expired leaf: when the chain fails only because the
/// client's certificate expired less than `grace` ago, it is verified again as of its own
/// notAfter, and if it was valid then, the identity is accepted marked [`CertIdentity::grace`].
pub fn verify_with_grace(
    chain: &[CertificateDer<'static>],
    trust: &[Arc<TrustSet>],
    known_intermediates: &[CertificateDer<'static>],
    now: SystemTime,
    grace: Duration,
) -> Result<CertIdentity, String> {
    let now_unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    match verify_at(chain, trust, known_intermediates, now_unix) {
        Err(Failure::Chain(webpki::Error::CertExpired { not_after, .. })) if !grace.is_zero() => {
            let expired_for = now_unix.saturating_sub(Duration::from_secs(not_after.as_secs()));
            let leaf_not_after = chain
                .first()
                .and_then(|leaf| X509Certificate::from_der(leaf).ok())
                .map(|(_, c)| c.validity().not_after.timestamp());
            // Only the client's own certificate gets grace, not an expired CA above it.
            let leaf_expired = leaf_not_after == i64::try_from(not_after.as_secs()).ok();
            if !leaf_expired || expired_for > grace {
                let expired = explain(webpki::Error::CertExpired {
                    time: UnixTime::since_unix_epoch(now_unix),
                    not_after,
                });
                return Err(if leaf_expired {
                    format!(
                        "{expired}, longer ago than this label's grace window ({} s)",
                        grace.as_secs()
                    )
                } else {
                    expired
                });
            }
            let then = Duration::from_secs(not_after.as_secs());
            match verify_at(chain, trust, known_intermediates, then) {
                Ok(mut identity) => {
                    identity.grace = true;
                    Ok(identity)
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Ok(identity) => Ok(identity),
        Err(e) => Err(e.to_string()),
    }
}

/// Why a chain was not accepted.
enum Failure {
    Chain(webpki::Error),
    Other(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Chain(e) => f.write_str(&explain(e.clone())),
            Failure::Other(text) => f.write_str(text),
        }
    }
}

/// Verifies the chain as of `time` (since the Unix epoch); the most telling error on failure.
fn verify_at(
    chain: &[CertificateDer<'static>],
    trust: &[Arc<TrustSet>],
    known_intermediates: &[CertificateDer<'static>],
    time: Duration,
) -> Result<CertIdentity, Failure> {
    let (leaf, presented_intermediates) = chain
        .split_first()
        .ok_or_else(|| Failure::Other("no certificate presented".into()))?;
    let end_entity = EndEntityCert::try_from(leaf)
        .map_err(|e| Failure::Other(format!("unparseable certificate: {e:?}")))?;
    let intermediates: Vec<CertificateDer<'static>> = presented_intermediates
        .iter()
        .chain(known_intermediates)
        .cloned()
        .collect();
    let time = UnixTime::since_unix_epoch(time);
    let algorithms = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;

    let mut best_error: Option<webpki::Error> = None;
    let direct = |path: &webpki::VerifiedPath<'_>| match path.intermediate_certificates().next() {
        None => Ok(()),
        // Reported as an unknown issuer: for this set, a deeper chain is not vouched for.
        Some(_) => Err(webpki::Error::UnknownIssuer),
    };
    for set in trust {
        let only_direct: Option<&PathCheck<'_>> =
            if set.direct_only { Some(&direct) } else { None };
        match end_entity.verify_for_usage(
            algorithms,
            &set.anchors,
            &intermediates,
            time,
            KeyUsage::client_auth(),
            None,
            only_direct,
        ) {
            Ok(path) => {
                let mut identity = describe(leaf, &set.name).map_err(Failure::Other)?;
                for intermediate in path.intermediate_certificates() {
                    let not_after = X509Certificate::from_der(&intermediate.der())
                        .map(|(_, c)| c.validity().not_after.to_datetime())
                        // webpki read it; should x509-parser not, the result holds for no time.
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                    identity.valid_until = identity.valid_until.min(not_after);
                }
                return Ok(identity);
            }
            // An unknown issuer from one set says less than, e.g., "expired" from the set
            // that knows the issuer: keep the most telling error.
            Err(e) => {
                if best_error.is_none() || !matches!(e, webpki::Error::UnknownIssuer) {
                    best_error = Some(e);
                }
            }
        }
    }
    Err(match best_error {
        None => Failure::Other("this label trusts no client certificates".to_owned()),
        Some(e) => Failure::Chain(e),
    })
}

fn explain(error: webpki::Error) -> String {
    use webpki::Error as E;
    match error {
        E::UnknownIssuer => "not issued by a CA this label trusts".to_owned(),
        E::CertExpired { not_after, .. } => {
            format!("expired at {}", format_unix(not_after.as_secs()))
        }
        E::CertNotValidYet { not_before, .. } => {
            format!("not valid before {}", format_unix(not_before.as_secs()))
        }
        E::RequiredEkuNotFoundContext(_) => {
            "its extended key usage does not allow client authentication".to_owned()
        }
        E::InvalidSignatureForPublicKey => "a signature in its chain does not verify".to_owned(),
        other => format!("invalid chain ({other:?})"),
    }
}

fn format_unix(secs: u64) -> String {
    OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

fn describe(leaf: &CertificateDer<'_>, trust: &str) -> Result<CertIdentity, String> {
    let (_, cert) =
        X509Certificate::from_der(leaf).map_err(|e| format!("unparseable certificate: {e}"))?;
    let subject =
        Subject::from_x509_name(cert.subject()).map_err(|e| format!("unusable subject: {e}"))?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => crate::est::name::sans_from_general_names(&ext.value.general_names),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("malformed subjectAltName: {e}")),
    };
    let not_after = cert.validity().not_after.to_datetime();
    Ok(CertIdentity {
        subject,
        sans,
        serial: hex(cert.raw_serial()),
        not_after,
        trust: trust.to_owned(),
        ca: cert.is_ca(),
        grace: false,
        valid_until: not_after,
    })
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
