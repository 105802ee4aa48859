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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use ::time::Duration as Span;
    use rcgen::{ExtendedKeyUsagePurpose, Issuer, KeyPair, SerialNumber};

    const DAY: u64 = 86_400;

    /// Unix seconds, whole (certificate dates have no fractions).
    fn unix_now() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }

    fn system_time(secs: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    }

    pub(crate) struct Ca {
        pub der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A CA valid from a month ago for a year unless `dates` says otherwise, self-signed or
    /// issued by `parent`.
    pub(crate) fn ca(
        cn: &str,
        path_len: Option<u8>,
        parent: Option<&Ca>,
        dates: Option<(i64, i64)>,
    ) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = crate::pki::ca_params(cn, path_len, Span::days(365));
        let (not_before, not_after) =
            dates.unwrap_or((unix_now() - 30 * DAY as i64, unix_now() + 365 * DAY as i64));
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        let cert = match parent {
            Some(p) => params.signed_by(&key, &p.issuer).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate issued by `parent`, valid between the two dates (Unix seconds).
    fn leaf(cn: &str, parent: &Ca, not_before: i64, not_after: i64) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            crate::pki::leaf_params(cn, vec![ExtendedKeyUsagePurpose::ClientAuth], Span::days(1));
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        params.serial_number = Some(SerialNumber::from(vec![0x0a, 0xbc, 0x01]));
        params
            .signed_by(&key, &parent.issuer)
            .unwrap()
            .der()
            .clone()
    }

    pub(crate) fn valid_leaf(cn: &str, parent: &Ca) -> CertificateDer<'static> {
        leaf(
            cn,
            parent,
            unix_now() - DAY as i64,
            unix_now() + 30 * DAY as i64,
        )
    }

    pub(crate) fn set(name: &str, anchor: &Ca, depth: chain::Depth) -> Arc<TrustSet> {
        Arc::new(TrustSet::with_depth(name, std::slice::from_ref(&anchor.der), depth).unwrap())
    }

    fn label(sets: &[Arc<TrustSet>]) -> LabelTrust<'_> {
        LabelTrust {
            sets,
            ..LabelTrust::default()
        }
    }

    /// `verify` checks against the sets given, with the known intermediates completing a leaf
    /// presented alone; what it returns describes the leaf.
    #[test]
    fn verify_uses_the_trust_sets_and_the_known_intermediates() {
        let root = ca("plant root", None, None, None);
        let issuing = ca("plant issuing CA", Some(0), Some(&root), None);
        let device = valid_leaf("dev-1", &issuing);
        let now = SystemTime::now();

        let direct = set("devices", &issuing, chain::Depth::Direct);
        let identity = verify(
            std::slice::from_ref(&device),
            std::slice::from_ref(&direct),
            &[],
            now,
        )
        .unwrap();
        assert_eq!(identity.subject.to_string(), "CN=dev-1");
        assert_eq!(identity.trust, "devices");
        assert_eq!(identity.serial, "0abc01");
        assert!(!identity.grace && !identity.ca && identity.device.is_none());
        assert_eq!(identity.to_string(), "certificate \"CN=dev-1\" (devices)");
        // No set: nothing vouches.
        let e = verify(std::slice::from_ref(&device), &[], &[], now).unwrap_err();
        assert_eq!(e, "this label trusts no client certificates");

        // Below the root through the issuing CA, which the client did not send: the known
        // intermediates complete the path; without them the issuer is unknown.
        let deep = set("plant", &root, chain::Depth::Any);
        assert_eq!(
            (deep.depth(), direct.depth()),
            (chain::Depth::Any, chain::Depth::Direct)
        );
        let known = [issuing.der.clone()];
        let identity = verify(
            std::slice::from_ref(&device),
            std::slice::from_ref(&deep),
            &known,
            now,
        )
        .unwrap();
        assert_eq!(identity.trust, "plant");
        let e = verify(std::slice::from_ref(&device), &[deep], &[], now).unwrap_err();
        assert_eq!(e, "not issued by a CA this label trusts");
    }

    /// A module's identity says whose module it is.
    #[test]
    fn a_module_identity_names_its_device() {
        let root = ca("plant root", None, None, None);
        let module = valid_leaf("edgeHub", &root);
        let identity = describe(&module, "issuer", Some("gw-1".into())).unwrap();
        assert_eq!(
            identity.to_string(),
            "certificate \"CN=edgeHub\" (module of device gw-1, issuer)"
        );
    }

    /// The grace window, to the second: a leaf that expired exactly `grace` ago is accepted
    /// (marked), one second later it is refused saying so. A label without a window refuses an
    /// expired leaf as expired, with its date, and says nothing of a window.
    #[test]
    fn the_grace_window_ends_to_the_second() {
        let issuing = ca("plant issuing CA", Some(0), None, None);
        let expired_at = unix_now() - 2 * DAY as i64;
        let device = leaf("dev-g", &issuing, expired_at - 90 * DAY as i64, expired_at);
        let chain = [device];
        let sets = [set("devices", &issuing, chain::Depth::Direct)];
        let trust = label(&sets);
        let grace = Duration::from_secs(DAY);
        let last_second = expired_at + DAY as i64;

        let identity = verify_for_label(&chain, &trust, system_time(last_second), grace).unwrap();
        assert!(identity.grace);
        assert_eq!(identity.subject.to_string(), "CN=dev-g");
        // Valid now: no grace, whatever the window.
        let identity = verify_for_label(&chain, &trust, system_time(expired_at), grace).unwrap();
        assert!(!identity.grace);

        let expired = format!("expired at {}", chain::format_unix(expired_at));
        let e = verify_for_label(&chain, &trust, system_time(last_second + 1), grace).unwrap_err();
        assert_eq!(
            e,
            format!("{expired}, longer ago than this label's grace window (86400 s)")
        );
        let e = verify_for_label(&chain, &trust, system_time(last_second + DAY as i64), grace)
            .unwrap_err();
        assert!(
            e.contains("longer ago than this label's grace window"),
            "{e}"
        );

        let e = verify_for_label(&chain, &trust, system_time(expired_at + 1), Duration::ZERO)
            .unwrap_err();
        assert_eq!(e, expired);
    }

    /// Only the client's own certificate gets grace: an issuing CA that expired within the
    /// window vouches for nothing (positive control: the same window lets the leaf itself
    /// renew).
    #[test]
    fn an_expired_ca_gets_no_grace() {
        let now = unix_now();
        let root = ca("plant root", None, None, None);
        let lapsed = ca(
            "plant issuing CA",
            Some(0),
            Some(&root),
            Some((now - 300 * DAY as i64, now - 3600)),
        );
        let device = leaf(
            "dev-1",
            &lapsed,
            now - 90 * DAY as i64,
            now + 30 * DAY as i64,
        );
        let sets = [set("plant", &root, chain::Depth::Any)];
        let trust = label(&sets);
        let grace = Duration::from_secs(7 * DAY);
        let e = verify_for_label(
            &[device, lapsed.der.clone()],
            &trust,
            system_time(now),
            grace,
        )
        .unwrap_err();
        assert!(e.contains(&chain::format_unix(now - 3600)), "{e}");
        assert!(!e.contains("grace"), "{e}");

        let issuing = ca("plant issuing CA", Some(0), Some(&root), None);
        let device = leaf("dev-1", &issuing, now - 90 * DAY as i64, now - 3600);
        let identity = verify_for_label(
            &[device, issuing.der.clone()],
            &trust,
            system_time(now),
            grace,
        )
        .unwrap();
        assert!(identity.grace);
    }

    /// Of the sets a label tries, the most telling refusal answers, whatever their order: the
    /// set that knows the issuer says "expired", not the one that does not know it.
    #[test]
    fn the_most_telling_refusal_answers() {
        let now = unix_now();
        let issuing = ca("plant issuing CA", Some(0), None, None);
        let stranger = ca("another plant's CA", Some(0), None, None);
        let device = leaf("dev-1", &issuing, now - 90 * DAY as i64, now - DAY as i64);
        let chain = [device];
        let knows = set("devices", &issuing, chain::Depth::Direct);
        let unknown = set("others", &stranger, chain::Depth::Direct);
        let expired = format!("expired at {}", chain::format_unix(now - DAY as i64));
        for sets in [
            [unknown.clone(), knows.clone()],
            [knows.clone(), unknown.clone()],
        ] {
            let e = verify_for_label(&chain, &label(&sets), system_time(now), Duration::ZERO)
                .unwrap_err();
            assert_eq!(e, expired);
        }
        // Of equally telling refusals, the first set's, in the label's order.
        let root = ca("plant root", None, None, None);
        let below = ca("plant issuing CA", Some(0), Some(&root), None);
        let device = valid_leaf("dev-1", &below);
        let first = set("first", &root, chain::Depth::Direct);
        let second = set("second", &root, chain::Depth::Direct);
        let path = [device, below.der.clone()];
        for (sets, says) in [
            ([first.clone(), second.clone()], "trust set first"),
            ([second, first], "trust set second"),
        ] {
            let e = verify_for_label(&path, &label(&sets), system_time(now), Duration::ZERO)
                .unwrap_err();
            assert!(e.contains(says), "{e}");
            assert!(e.contains("not issued directly"), "{e}");
        }
    }

    /// A trust set that keeps its retired root during a rollover (same name, old key, now
    /// expired) next to the new one: the retired root vouches for nothing, whatever the
    /// order, and each anchor's own dates are the ones checked (positive control: the new
    /// root's device).
    #[test]
    fn a_retired_root_of_the_same_name_vouches_for_nothing() {
        let now = unix_now();
        let new_root = ca("plant root", None, None, None);
        let retired = ca(
            "plant root",
            None,
            None,
            Some((now - 800 * DAY as i64, now - DAY as i64)),
        );
        let from_retired = vec![leaf("dev-1", &retired, now - DAY as i64, now + DAY as i64)];
        let from_new = vec![valid_leaf("dev-1", &new_root)];
        for anchors in [
            [new_root.der.clone(), retired.der.clone()],
            [retired.der.clone(), new_root.der.clone()],
        ] {
            let sets = [Arc::new(TrustSet::new("plant", &anchors).unwrap())];
            let trust = label(&sets);
            let e = verify_for_label(&from_retired, &trust, system_time(now), Duration::ZERO)
                .unwrap_err();
            assert!(
                e.contains("the trust anchor of trust set plant expired at"),
                "{e}"
            );
            let identity =
                verify_for_label(&from_new, &trust, system_time(now), Duration::ZERO).unwrap();
            assert_eq!(identity.trust, "plant");
        }
    }

    /// `issuer`: what the label's issuing CA signed on this label (its journal's index), not
    /// everything it signed. A certificate the same CA issued on another label is refused
    /// (positive control: the one issued here; and a set of another name needs no record).
    #[test]
    fn issuer_means_issued_on_this_label() {
        let issuing = ca("layer issuing CA", Some(0), None, None);
        let here = valid_leaf("dev-1", &issuing);
        let elsewhere = valid_leaf("dev-1", &issuing);
        let index = chain::IssuanceIndex::new();
        let hex_of = |der: &CertificateDer<'_>| hex(&chain::fingerprint(der));
        index.record(&hex_of(&here), Some("narrow"));
        index.record(&hex_of(&elsewhere), Some("wide"));
        let labels = [Some("narrow".to_owned())];
        let issuer_set = [set(chain::ISSUER_SET, &issuing, chain::Depth::Direct)];
        let trust = LabelTrust {
            sets: &issuer_set,
            hierarchy: Hierarchy {
                index: Some(&index),
                issuer_labels: &labels,
                ..Hierarchy::default()
            },
            ..LabelTrust::default()
        };
        let now = SystemTime::now();
        let identity =
            verify_for_label(std::slice::from_ref(&here), &trust, now, Duration::ZERO).unwrap();
        assert_eq!(identity.trust, "issuer");
        let e = verify_for_label(
            std::slice::from_ref(&elsewhere),
            &trust,
            now,
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(e.contains("not issued on this label"), "{e}");

        let devices = [set("devices", &issuing, chain::Depth::Direct)];
        let trust = LabelTrust {
            sets: &devices,
            ..trust
        };
        verify_for_label(
            std::slice::from_ref(&elsewhere),
            &trust,
            now,
            Duration::ZERO,
        )
        .unwrap();
    }

    /// What a verification found holds until the earliest notAfter on its path, the leaf's,
    /// an intermediate's or the anchor's (a connection that keeps it must not outlive a CA).
    #[test]
    fn a_verification_holds_until_the_earliest_not_after_on_its_path() {
        let now = unix_now();
        let (month_ago, soon, later) = (
            now - 30 * DAY as i64,
            now + 5 * DAY as i64,
            now + 10 * DAY as i64,
        );
        let root = ca("plant root", None, None, Some((month_ago, soon)));
        let issuing = ca(
            "plant issuing CA",
            Some(0),
            Some(&root),
            Some((month_ago, later)),
        );
        let device = leaf("dev-1", &issuing, month_ago, now + 30 * DAY as i64);
        let path = [device.clone(), issuing.der.clone()];
        let until = |sets: &[Arc<TrustSet>], chain: &[CertificateDer<'static>]| {
            verify_for_label(chain, &label(sets), system_time(now), Duration::ZERO)
                .unwrap()
                .valid_until
                .unix_timestamp()
        };
        // The anchor's.
        assert_eq!(
            until(&[set("plant", &root, chain::Depth::Any)], &path),
            soon
        );
        // The intermediate's (the anchor lasts longer).
        let long_root = ca("plant root", None, None, None);
        let issuing = ca(
            "plant issuing CA",
            Some(0),
            Some(&long_root),
            Some((month_ago, later)),
        );
        let device = leaf("dev-1", &issuing, month_ago, now + 30 * DAY as i64);
        let path = [device, issuing.der.clone()];
        assert_eq!(
            until(&[set("plant", &long_root, chain::Depth::Any)], &path),
            later
        );
        // The leaf's.
        let short = leaf("dev-1", &issuing, month_ago, now + DAY as i64);
        let path = [short, issuing.der.clone()];
        assert_eq!(
            until(&[set("plant", &long_root, chain::Depth::Any)], &path),
            now + DAY as i64
        );
    }

    /// Any CA this layer's issuing CA issued is a device's own (every device obtains one, its
    /// Edge CA), whatever its name: a set of depth `any` does not take what a device minted
    /// below it (positive control: a certificate the issuing CA issued directly).
    #[test]
    fn a_ca_the_issuing_ca_issued_is_a_devices_own_whatever_its_name() {
        let root = ca("plant root", None, None, None);
        let issuing = ca("layer issuing CA", Some(1), Some(&root), None);
        let devices_ca = ca("line controller", Some(0), Some(&issuing), None);
        let minted = valid_leaf("dev-victim", &devices_ca);
        let direct = valid_leaf("dev-1", &issuing);
        let sets = [set("plant", &root, chain::Depth::Any)];
        let issuing_cas = [chain::CaKey::of(&issuing.der).unwrap()];
        let trust = LabelTrust {
            sets: &sets,
            hierarchy: Hierarchy {
                issuing_cas: &issuing_cas,
                ..Hierarchy::default()
            },
            ..LabelTrust::default()
        };
        let now = SystemTime::now();
        let path = [minted, devices_ca.der.clone(), issuing.der.clone()];
        let e = verify_for_label(&path, &trust, now, Duration::ZERO).unwrap_err();
        assert!(
            e.contains("issued below \"line controller\", a device's own CA"),
            "{e}"
        );
        let identity =
            verify_for_label(&[direct, issuing.der.clone()], &trust, now, Duration::ZERO).unwrap();
        assert_eq!(identity.subject.to_string(), "CN=dev-1");
    }
}
