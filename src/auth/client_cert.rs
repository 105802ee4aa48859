//! Client certificate validation, per label.
//!
//! The TLS layer only checks that the client holds the key of the certificate it presents
//! (see `transport::tls`); the chain is validated here, against the trust sets of the label
//! the request is for. That gives each label its own anchors and gives clients an HTTP answer
//! that says what was wrong instead of a bare TLS alert.

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::time::OffsetDateTime;
use rustls::pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::*;

pub use super::chain::TrustSet;
use super::chain::{self, Hierarchy};
use crate::est::{SanEntry, Subject};

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug)]
pub struct CertIdentity {
    pub subject: Subject,
    pub sans: Vec<SanEntry>,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_after: OffsetDateTime,
    /// The trust set that vouched for it (for a module: for its device's Edge CA).
    pub trust: String,
    /// Whether it is a CA certificate (basicConstraints CA:TRUE).
    pub ca: bool,
    /// It had expired, and was accepted within the label's grace window: it may only renew
    /// its own subject and subjectAltNames (see `policy`).
    pub grace: bool,
    /// The earliest notAfter on the verified path (the leaf's, an intermediate's or the
    /// anchor's): the verification holds until then, for the same trust sets.
    pub valid_until: OffsetDateTime,
    /// A module's certificate: issued by the Edge CA of this device (see `auth::ra`). Such an
    /// identity matches `module:DEVICE/MODULE` rules only, never `certificate:` ones.
    pub device: Option<String>,
}

impl fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.device {
            Some(device) => write!(
                f,
                "certificate \"{}\" (module of device {device}, {})",
                self.subject, self.trust
            ),
            None => write!(f, "certificate \"{}\" ({})", self.subject, self.trust),
        }
    }
}

/// What a label trusts, for one verification.
#[derive(Clone, Copy, Default)]
pub struct LabelTrust<'a> {
    /// The label's trust sets, in the order of its `client_trust`.
    pub sets: &'a [Arc<TrustSet>],
    /// Names of the sets whose CAs issue devices' Edge CAs, for module identities (the label's
    /// `module:` rules); empty: module identities are not looked for.
    pub module_sets: &'a [String],
    /// Certificates that may complete a chain the client did not send whole.
    pub intermediates: &'a [CertificateDer<'static>],
    pub hierarchy: Hierarchy<'a>,
}

/// Validates a presented chain (leaf first) for client authentication against trust sets,
/// with `known_intermediates` standing in for a chain the client did not send (IoT Edge often
/// presents the leaf alone). Nothing is known of the hierarchy here: no certificate counts
/// as issued by a label (`issuer`), and no module identity is looked for.
pub fn verify(
    chain: &[CertificateDer<'static>],
    trust: &[Arc<TrustSet>],
    known_intermediates: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<CertIdentity, String> {
    let label = LabelTrust {
        sets: trust,
        intermediates: known_intermediates,
        ..LabelTrust::default()
    };
    verify_for_label(chain, &label, now, Duration::ZERO)
}

/// Validates a presented chain for a label, with a grace window for an expired leaf: when the
/// chain fails only because the client's certificate expired less than `grace` ago, it is
/// verified again as of its own notAfter, and if it was valid then, the identity is accepted
/// marked [`CertIdentity::grace`]. Every CA on the path must be valid at `now` either way.
pub fn verify_for_label(
    chain: &[CertificateDer<'static>],
    trust: &LabelTrust<'_>,
    now: SystemTime,
    grace: Duration,
) -> Result<CertIdentity, String> {
    let now_unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    match verify_at(chain, trust, now_unix, now_unix) {
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
            // The leaf as of its own notAfter; every CA above it still as of now.
            let then = Duration::from_secs(not_after.as_secs());
            match verify_at(chain, trust, then, now_unix) {
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
    /// A path webpki verified, refused by `chain` or `ra` (ranked: see [`rank`]).
    Refused {
        rank: u8,
        reason: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Chain(e) => f.write_str(&explain(e.clone())),
            Failure::Other(text) | Failure::Refused { reason: text, .. } => f.write_str(text),
        }
    }
}

/// Ranks of refusals: a path that is no module's at all, a path a set refused, a module's
/// path refused (an Edge CA not issued here, a CA on it expired).
const NOT_A_MODULE: u8 = 1;
const SET_REFUSED: u8 = 3;
const MODULE_REFUSED: u8 = 4;

/// How telling a failure is, to answer with the most telling one of all sets tried: an
/// unknown issuer from one set says less than "expired" from the set that knows the issuer.
fn rank(failure: &Failure) -> u8 {
    match failure {
        Failure::Chain(webpki::Error::UnknownIssuer) => 0,
        Failure::Chain(_) => 2,
        Failure::Other(_) => SET_REFUSED,
        Failure::Refused { rank, .. } => *rank,
    }
}

/// Verifies the chain with the leaf as of `time` and every CA as of `now` (both since the
/// Unix epoch): first against each trust set as a client of it, then, for module rules, as a
/// module of a device. The most telling error on failure.
fn verify_at(
    chain: &[CertificateDer<'static>],
    trust: &LabelTrust<'_>,
    time: Duration,
    now: Duration,
) -> Result<CertIdentity, Failure> {
    let (leaf, presented_intermediates) = chain
        .split_first()
        .ok_or_else(|| Failure::Other("no certificate presented".into()))?;
    let end_entity = EndEntityCert::try_from(leaf)
        .map_err(|e| Failure::Other(format!("unparseable certificate: {e:?}")))?;
    let intermediates: Vec<CertificateDer<'static>> = presented_intermediates
        .iter()
        .chain(trust.intermediates)
        .cloned()
        .collect();
    let time = UnixTime::since_unix_epoch(time);
    let now = now.as_secs() as i64;
    let algorithms = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;

    let mut best: Option<Failure> = None;
    let mut keep = |failure: Failure| {
        if best.as_ref().is_none_or(|b| rank(&failure) > rank(b)) {
            best = Some(failure);
        }
    };
    // As a client of each set, then as a module (a module path is never a set's client).
    let attempts = trust.sets.iter().map(|s| (s, false)).chain(
        trust
            .sets
            .iter()
            .filter(|s| trust.module_sets.contains(&s.name))
            .map(|s| (s, true)),
    );
    for (set, as_module) in attempts {
        // What the path check found: the device (modules), the earliest CA notAfter; or why
        // it refused the path.
        let found: RefCell<Option<(Option<String>, i64)>> = RefCell::new(None);
        let refusal: RefCell<Option<(u8, String)>> = RefCell::new(None);
        let check = |path: &webpki::VerifiedPath<'_>| {
            let cas: Vec<CertificateDer<'_>> =
                path.intermediate_certificates().map(|c| c.der()).collect();
            let checked = if as_module {
                super::ra::check_module_path(set, &cas, path.anchor(), &trust.hierarchy, now)
                    .map(Some)
                    .map_err(|e| {
                        let rank = if e.is_module {
                            MODULE_REFUSED
                        } else {
                            NOT_A_MODULE
                        };
                        (rank, e.reason)
                    })
            } else {
                chain::check_path(set, leaf, &cas, path.anchor(), &trust.hierarchy, now)
                    .map(|()| None)
                    .map_err(|reason| (SET_REFUSED, reason))
            };
            match checked.and_then(|device| {
                chain::earliest_not_after(set, &cas, path.anchor())
                    .map(|t| (device, t))
                    .map_err(|reason| (SET_REFUSED, reason))
            }) {
                Ok(facts) => {
                    *found.borrow_mut() = Some(facts);
                    Ok(())
                }
                Err(reason) => {
                    *refusal.borrow_mut() = Some(reason);
                    Err(webpki::Error::UnknownIssuer)
                }
            }
        };
        match end_entity.verify_for_usage(
            algorithms,
            set.anchors(),
            &intermediates,
            time,
            KeyUsage::client_auth(),
            None,
            Some(&check),
        ) {
            Ok(_) => {
                let (device, ca_not_after) = found.into_inner().unwrap_or((None, 0));
                let mut identity = describe(leaf, &set.name, device).map_err(Failure::Other)?;
                let ca_not_after = OffsetDateTime::from_unix_timestamp(ca_not_after)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                identity.valid_until = identity.valid_until.min(ca_not_after);
                return Ok(identity);
            }
            Err(e) => keep(match refusal.into_inner() {
                Some((rank, reason)) => Failure::Refused { rank, reason },
                None => Failure::Chain(e),
            }),
        }
    }
    Err(best
        .unwrap_or_else(|| Failure::Other("this label trusts no client certificates".to_owned())))
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
    chain::format_unix(secs as i64)
}

fn describe(
    leaf: &CertificateDer<'_>,
    trust: &str,
    device: Option<String>,
) -> Result<CertIdentity, String> {
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
        device,
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
