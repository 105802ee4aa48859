//! What a certificate chain proves, in one place.
//!
//! webpki proves that a path of signatures leads from the client's certificate to an anchor of
//! a trust set and that each certificate was valid at the time asked. Everything else a chain
//! means for an EST server of an IoT Edge hierarchy is decided here:
//!
//! - **Depth.** A trust set accepts certificates issued *directly* by its anchors unless it says
//!   `depth = "any"` (see [`Depth`]).
//! - **Device-owned CAs.** Every device of the hierarchy holds an Edge CA (CA:TRUE, pathlen 0)
//!   issued by an issuing CA of the hierarchy, and mints whatever it likes below it. A path
//!   through such a CA proves at most "a module of that device" ([`crate::auth::ra`]), never an
//!   identity of a trust set: [`is_device_owned`].
//! - **Which label issued what** ([`IssuanceIndex`]): `issuer` on a label means a certificate
//!   *this label* issued (or a label of its `issuer_labels` group), recorded in the journal,
//!   not anything the same issuing CA ever signed.
//! - **Every CA on the path valid now**, the trust anchor included: only the client's own
//!   certificate may be looked at as of an earlier time (the grace window).

use std::collections::HashMap;
use std::sync::RwLock;

use rustls::pki_types::{CertificateDer, TrustAnchor};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

/// The name `client_trust` uses for the label's own issuing CA (and, on forwarding labels, the
/// upstream's): certificates this label issued.
pub const ISSUER_SET: &str = "issuer";

/// How deep below its anchors a trust set accepts a client certificate.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Depth {
    /// Only certificates issued directly by an anchor (the default): list the CAs that issue
    /// the client certificates, not a root above them.
    #[default]
    Direct,
    /// Certificates below any CA that chains to an anchor, except through a device-owned CA
    /// ([`is_device_owned`]). For PKIs whose issuing CAs are not all known; `check-config`
    /// warns where rules use such a set.
    Any,
}

impl Depth {
    pub fn is_direct(&self) -> bool {
        *self == Depth::Direct
    }
}

/// A named set of trust anchors for client certificates, with its depth.
pub struct TrustSet {
    pub name: String,
    anchors: Vec<TrustAnchor<'static>>,
    /// Validity of each anchor (same order), in Unix seconds: an expired anchor vouches for
    /// nothing.
    anchor_validity: Vec<(i64, i64)>,
    depth: Depth,
}

impl TrustSet {
    /// A set accepting certificates issued directly by `certificates`.
    pub fn new(name: &str, certificates: &[CertificateDer<'static>]) -> Result<TrustSet, String> {
        Self::with_depth(name, certificates, Depth::Direct)
    }

    /// The same as [`TrustSet::new`]: every set is direct unless it says otherwise.
    pub fn direct(
        name: &str,
        certificates: &[CertificateDer<'static>],
    ) -> Result<TrustSet, String> {
        Self::with_depth(name, certificates, Depth::Direct)
    }

    pub fn with_depth(
        name: &str,
        certificates: &[CertificateDer<'static>],
        depth: Depth,
    ) -> Result<TrustSet, String> {
        let mut anchors = Vec::new();
        let mut anchor_validity = Vec::new();
        for c in certificates {
            let anchor = webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(|e| format!("trust set {name}: unusable CA certificate: {e:?}"))?;
            let (_, parsed) = X509Certificate::from_der(c)
                .map_err(|e| format!("trust set {name}: unusable CA certificate: {e}"))?;
            anchors.push(anchor);
            anchor_validity.push((
                parsed.validity().not_before.timestamp(),
                parsed.validity().not_after.timestamp(),
            ));
        }
        if anchors.is_empty() {
            return Err(format!("trust set {name} holds no certificate"));
        }
        Ok(TrustSet {
            name: name.to_owned(),
            anchors,
            anchor_validity,
            depth,
        })
    }

    pub fn depth(&self) -> Depth {
        self.depth
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// Whether this set is a label's own issuance (`issuer`): its certificates must also be
    /// recorded under the label ([`IssuanceIndex`]).
    pub fn is_issuer(&self) -> bool {
        self.name == ISSUER_SET
    }

    fn validity_of(&self, anchor: &TrustAnchor<'_>) -> Option<(i64, i64)> {
        let found = self.anchors.iter().position(|a| {
            a.subject.as_ref() == anchor.subject.as_ref()
                && a.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
        });
        found.map(|i| self.anchor_validity[i])
    }

    fn anchor_not_after(&self, anchor: &TrustAnchor<'_>) -> Option<i64> {
        self.validity_of(anchor).map(|(_, not_after)| not_after)
    }

    /// The anchor a path ended at must be valid at `now` (Unix seconds).
    pub(crate) fn check_anchor(&self, anchor: &TrustAnchor<'_>, now: i64) -> Result<(), String> {
        match self.validity_of(anchor) {
            Some((not_before, _)) if now < not_before => Err(format!(
                "the trust anchor of trust set {} is not valid before {}",
                self.name,
                format_unix(not_before)
            )),
            Some((_, not_after)) if now > not_after => Err(format!(
                "the trust anchor of trust set {} expired at {}",
                self.name,
                format_unix(not_after)
            )),
            _ => Ok(()),
        }
    }
}

/// A CA as webpki names it: subject and public key. Two certificates with the same key are
/// the same CA for chaining (a renewed CA certificate with the same key still is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaKey {
    subject: Vec<u8>,
    spki: Vec<u8>,
}

impl CaKey {
    pub fn of(cert: &CertificateDer<'_>) -> Option<CaKey> {
        webpki::anchor_from_trusted_cert(cert)
            .ok()
            .map(|a| Self::of_anchor(&a))
    }

    pub(crate) fn of_anchor(anchor: &TrustAnchor<'_>) -> CaKey {
        CaKey {
            subject: anchor.subject.as_ref().to_vec(),
            spki: anchor.subject_public_key_info.as_ref().to_vec(),
        }
    }
}

/// What the certificates around a label say about the hierarchy, for one verification.
#[derive(Clone, Copy, Default)]
pub struct Hierarchy<'a> {
    /// The issuing CAs of this layer (its issuers' CAs, and on forwarding labels the
    /// upstream's issuing CA): a CA they issued is a device's own ([`is_device_owned`]).
    pub issuing_cas: &'a [CaKey],
    /// Which certificates this layer issued, and under which label. `None`: nothing is known
    /// to be issued here, and no `issuer` certificate authenticates.
    pub index: Option<&'a IssuanceIndex>,
    /// The labels whose issuance counts as `issuer` on this label (itself first).
    pub issuer_labels: &'a [Option<String>],
}

/// What a CA certificate on a path says about itself.
pub(crate) struct CaFacts {
    pub cn: Option<String>,
    pub ca: bool,
    pub path_len: Option<u32>,
    pub not_before: i64,
    pub not_after: i64,
    pub key: Option<CaKey>,
}

impl CaFacts {
    pub fn of(der: &CertificateDer<'_>) -> Result<CaFacts, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("unparseable CA certificate on the path: {e}"))?;
        let constraints = cert.basic_constraints().ok().flatten().map(|b| b.value);
        let cn: Option<String> = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(CaFacts {
            cn,
            ca: constraints.is_some_and(|b| b.ca),
            path_len: constraints.and_then(|b| b.path_len_constraint),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            key: CaKey::of(der),
        })
    }

    fn name(&self) -> String {
        self.cn.clone().unwrap_or_else(|| "(no CN)".to_owned())
    }

    /// Every CA on a path must be valid now, whatever time the path was verified for.
    pub fn check_valid_at(&self, now: i64) -> Result<(), String> {
        if now < self.not_before {
            return Err(format!(
                "the CA \"{}\" on its path is not valid before {}",
                self.name(),
                format_unix(self.not_before)
            ));
        }
        if now > self.not_after {
            return Err(format!(
                "the CA \"{}\" on its path expired at {}",
                self.name(),
                format_unix(self.not_after)
            ));
        }
        Ok(())
    }
}

/// The CN prefix IoT Edge gives an Edge CA (`aziot-edge CA <device id>`), the name a device
/// may obtain only for itself (`ca_common_names = ["aziot-edge CA {cn}"]`).
pub const EDGE_CA_PREFIX: &str = "aziot-edge CA ";

/// Whether a CA below a trust anchor belongs to a device: issued directly by one of this
/// layer's issuing CAs (whose CA certificates go to devices: Edge CAs), recorded in this
/// layer's journal (it issued it), or shaped and named like IoT Edge's Edge CA (pathlen 0,
/// `aziot-edge CA …`). Whoever holds such a CA mints certificates of any name below it.
pub(crate) fn is_device_owned(
    ca: &CaFacts,
    der: &[u8],
    parent: Option<&CaKey>,
    hierarchy: &Hierarchy<'_>,
) -> bool {
    let issued_by_issuing_ca = parent.is_some_and(|p| hierarchy.issuing_cas.contains(p))
        && !ca
            .key
            .as_ref()
            .is_some_and(|k| hierarchy.issuing_cas.contains(k));
    let issued_here = hierarchy.index.is_some_and(|i| i.knows(der));
    let named_like_edge_ca = ca.path_len == Some(0)
        && ca
            .cn
            .as_deref()
            .is_some_and(|cn| cn.starts_with(EDGE_CA_PREFIX));
    issued_by_issuing_ca || issued_here || named_like_edge_ca
}

/// Checks a path webpki verified against `set` (leaf first; `intermediates` from the leaf's
/// issuer up; `anchor` where it ended), as of `now` (Unix seconds): every CA valid now, the
/// set's depth, no device-owned CA on the way, and for `issuer` the label's own issuance.
pub(crate) fn check_path(
    set: &TrustSet,
    leaf: &[u8],
    intermediates: &[CertificateDer<'_>],
    anchor: &TrustAnchor<'_>,
    hierarchy: &Hierarchy<'_>,
    now: i64,
) -> Result<(), String> {
    set.check_anchor(anchor, now)?;
    if set.depth == Depth::Direct && !intermediates.is_empty() {
        return Err(format!(
            "not issued directly by a CA of trust set {} (it accepts no CA in between)",
            set.name
        ));
    }
    let facts = intermediates
        .iter()
        .map(CaFacts::of)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, ca) in facts.iter().enumerate() {
        ca.check_valid_at(now)?;
        let parent = match facts.get(i + 1) {
            Some(next) => next.key.clone(),
            None => Some(CaKey::of_anchor(anchor)),
        };
        if is_device_owned(ca, &intermediates[i], parent.as_ref(), hierarchy) {
            return Err(format!(
                "issued below \"{}\", a device's own CA: a certificate from it proves at most \
                 a module of that device",
                ca.name()
            ));
        }
    }
    if set.is_issuer() {
        check_issued_here(leaf, hierarchy)?;
    }
    Ok(())
}

/// The earliest notAfter (Unix seconds) of the CAs of a path, its anchor included: the
/// verification holds until then.
pub(crate) fn earliest_not_after(
    set: &TrustSet,
    intermediates: &[CertificateDer<'_>],
    anchor: &TrustAnchor<'_>,
) -> Result<i64, String> {
    let mut earliest = set.anchor_not_after(anchor).unwrap_or(i64::MAX);
    for ca in intermediates {
        earliest = earliest.min(CaFacts::of(ca)?.not_after);
    }
    Ok(earliest)
}

/// `issuer`: the certificate must have been issued on this label (or one of its group).
pub(crate) fn check_issued_here(der: &[u8], hierarchy: &Hierarchy<'_>) -> Result<(), String> {
    let here = hierarchy
        .index
        .is_some_and(|index| index.issued_on(der, hierarchy.issuer_labels));
    if here {
        Ok(())
    } else {
        Err("not issued on this label (its journal records no such issuance here)".to_owned())
    }
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Which label issued which certificate (SHA-256 of the DER → label), for this layer's own
/// issuances, local and forwarded alike. Rebuilt from the journal at start, updated on every
/// journaled issuance; certificates expired for longer than the longest grace window are
/// left out.
#[derive(Default)]
pub struct IssuanceIndex {
    inner: RwLock<IndexInner>,
}

#[derive(Default)]
struct IndexInner {
    by_fingerprint: HashMap<[u8; 32], u32>,
    /// Label names, interned: index 0 is the unlabeled path.
    labels: Vec<Option<String>>,
    /// Per signing CA (SHA-256): the latest notAfter (Unix seconds) of what it signed here.
    last_signed_by: HashMap<[u8; 32], i64>,
    /// The latest notAfter of a local issuance whose entry names no signing CA (journaled
    /// before entries did): until then no replaced CA can be told to have signed nothing.
    unattributed_until: i64,
}

impl IndexInner {
    fn label_id(&mut self, label: Option<&str>) -> u32 {
        if let Some(i) = self.labels.iter().position(|l| l.as_deref() == label) {
            return i as u32;
        }
        self.labels.push(label.map(str::to_owned));
        (self.labels.len() - 1) as u32
    }
}

/// How long after its expiry a certificate stays in the index: the longest grace window.
const KEPT_AFTER_EXPIRY_SECS: i64 = 366 * 86_400;

impl IssuanceIndex {
    pub fn new() -> IssuanceIndex {
        IssuanceIndex::default()
    }

    /// Adds a journal entry read back at start, unless its certificate expired longer ago
    /// than any grace window reaches (`now`: Unix seconds).
    pub fn record_entry(&self, entry: &crate::journal::JournalEntry, now: i64) {
        let expired_long_ago = ::time::OffsetDateTime::parse(
            &entry.not_after,
            &::time::format_description::well_known::Rfc3339,
        )
        .is_ok_and(|t| t.unix_timestamp() + KEPT_AFTER_EXPIRY_SECS < now);
        if !expired_long_ago {
            self.record(&entry.sha256, entry.label.as_deref());
        }
        self.record_signer(entry);
    }

    /// Records a journaled issuance: its label, and the CA that signed it.
    pub fn record_issued(&self, entry: &crate::journal::JournalEntry) {
        self.record(&entry.sha256, entry.label.as_deref());
        self.record_signer(entry);
    }

    /// Notes until when the CA that signed a local issuance has a certificate in use.
    fn record_signer(&self, entry: &crate::journal::JournalEntry) {
        if entry.issued_by != "local" {
            return;
        }
        let Ok(not_after) = ::time::OffsetDateTime::parse(
            &entry.not_after,
            &::time::format_description::well_known::Rfc3339,
        )
        .map(|t| t.unix_timestamp()) else {
            return;
        };
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        match entry.issuer_ca.as_deref().and_then(unhex32) {
            Some(ca) => {
                let last = inner.last_signed_by.entry(ca).or_insert(not_after);
                *last = (*last).max(not_after);
            }
            None => inner.unattributed_until = inner.unattributed_until.max(not_after),
        }
    }

    /// The latest notAfter (Unix seconds) of what the CA of SHA-256 `ca` signed here, `None`
    /// when the journal records nothing it signed; and the latest notAfter of local
    /// issuances journaled without their signing CA.
    pub fn last_signed_by(&self, ca: &[u8; 32]) -> (Option<i64>, i64) {
        self.inner.read().map_or((None, i64::MAX), |i| {
            (i.last_signed_by.get(ca).copied(), i.unattributed_until)
        })
    }

    /// Records that `label` issued the certificate of SHA-256 `sha256_hex` (lowercase hex).
    pub fn record(&self, sha256_hex: &str, label: Option<&str>) {
        let Some(fingerprint) = unhex32(sha256_hex) else {
            return;
        };
        if let Ok(mut inner) = self.inner.write() {
            let id = inner.label_id(label);
            inner.by_fingerprint.insert(fingerprint, id);
        }
    }

    /// Whether this layer issued `der` under one of `labels`.
    pub fn issued_on(&self, der: &[u8], labels: &[Option<String>]) -> bool {
        let fingerprint = fingerprint(der);
        let Ok(inner) = self.inner.read() else {
            return false;
        };
        inner
            .by_fingerprint
            .get(&fingerprint)
            .and_then(|id| inner.labels.get(*id as usize))
            .is_some_and(|label| labels.contains(label))
    }

    /// Whether this layer issued `der` at all.
    pub fn knows(&self, der: &[u8]) -> bool {
        let fingerprint = fingerprint(der);
        self.inner
            .read()
            .is_ok_and(|i| i.by_fingerprint.contains_key(&fingerprint))
    }

    /// Certificates indexed.
    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |i| i.by_fingerprint.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub(crate) fn format_unix(secs: i64) -> String {
    ::time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&::time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_knows_the_label_of_each_fingerprint() {
        let index = IssuanceIndex::new();
        let der = b"certificate".to_vec();
        let hex: String = fingerprint(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        index.record(&hex, Some("narrow"));
        assert!(index.knows(&der));
        assert!(index.issued_on(&der, &[Some("narrow".into())]));
        assert!(!index.issued_on(&der, &[None]));
        assert!(!index.issued_on(b"other", &[Some("narrow".into())]));
        index.record("not hex", None);
        assert_eq!(index.len(), 1);
    }

    /// A journal read back at start: a certificate that expired longer ago than any grace
    /// window reaches is left out (memory), one that expired within it is kept.
    #[test]
    fn entries_long_expired_are_left_out_of_the_index() {
        let index = IssuanceIndex::new();
        let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
        let entry = |der: &[u8], not_after: &str| {
            let mut entry: crate::journal::JournalEntry =
                serde_json::from_value(serde_json::json!({
                    "time": "", "serial": "", "subject": "", "sans": [], "label": "l",
                    "operation": "", "identity": "", "profile": "", "not_before": "",
                    "not_after": not_after, "sha256": "", "certificate": "",
                }))
                .unwrap();
            entry.sha256 = fingerprint(der)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            entry
        };
        let fmt = |secs: i64| {
            ::time::OffsetDateTime::from_unix_timestamp(secs)
                .unwrap()
                .format(&::time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        let day = 86_400;
        index.record_entry(
            &entry(b"old", &fmt(now - KEPT_AFTER_EXPIRY_SECS - day)),
            now,
        );
        index.record_entry(
            &entry(b"recent", &fmt(now - KEPT_AFTER_EXPIRY_SECS + day)),
            now,
        );
        index.record_entry(&entry(b"valid", &fmt(now + day)), now);
        // The longest grace window a label may have is 366 days (`config::validate`): a
        // certificate that expired a year ago may still renew.
        index.record_entry(&entry(b"a year ago", &fmt(now - 365 * day)), now);
        assert!(index.knows(b"a year ago"));
        // The last second a grace window could reach: kept.
        index.record_entry(&entry(b"edge", &fmt(now - KEPT_AFTER_EXPIRY_SECS)), now);
        assert!(index.knows(b"edge"));
        assert!(!index.knows(b"old"));
        assert!(index.knows(b"recent"));
        assert!(index.knows(b"valid"));
    }

    /// Every CA on a path valid now: webpki checks the path as of the time asked (for a
    /// grace renewal, the leaf's expiry), so this check is what refuses a CA that expired
    /// since or (were the time asked later than now) is not valid yet.
    #[test]
    fn a_ca_is_valid_only_between_its_dates() {
        let now = ::time::OffsetDateTime::now_utc();
        let ca = |not_before: ::time::OffsetDateTime, not_after: ::time::OffsetDateTime| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = crate::pki::ca_params("line CA", Some(0), ::time::Duration::days(1));
            params.not_before = not_before;
            params.not_after = not_after;
            let der = params.self_signed(&key).unwrap().der().clone();
            CaFacts::of(&der).unwrap()
        };
        let t = now.unix_timestamp();
        let day = ::time::Duration::days(1);
        assert_eq!(ca(now - day, now + day).check_valid_at(t), Ok(()));
        let early = ca(now + day, now + 2 * day).check_valid_at(t).unwrap_err();
        assert!(
            early.contains("\"line CA\" on its path is not valid before"),
            "{early}"
        );
        let late = ca(now - 2 * day, now - day).check_valid_at(t).unwrap_err();
        assert!(
            late.contains("\"line CA\" on its path expired at"),
            "{late}"
        );
        // Both dates are inclusive (RFC 5280 4.1.2.5), to the second.
        let at = ::time::OffsetDateTime::from_unix_timestamp(t).unwrap();
        let exact = ca(at, at + day);
        assert_eq!(exact.check_valid_at(t), Ok(()));
        assert!(exact.check_valid_at(t - 1).is_err());
        let exact = ca(at - day, at);
        assert_eq!(exact.check_valid_at(t), Ok(()));
        assert!(exact.check_valid_at(t + 1).is_err());
    }

    /// A trust anchor vouches between its dates only, both inclusive.
    #[test]
    fn a_trust_anchor_is_valid_only_between_its_dates() {
        let t = ::time::OffsetDateTime::now_utc().unix_timestamp();
        let at = ::time::OffsetDateTime::from_unix_timestamp(t).unwrap();
        let day = ::time::Duration::days(1);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = crate::pki::ca_params("factory CA", None, day);
        params.not_before = at;
        params.not_after = at + day;
        let der = params.self_signed(&key).unwrap().der().clone();
        let set = TrustSet::new("factory", std::slice::from_ref(&der)).unwrap();
        let anchor = &set.anchors()[0];
        let until = t + day.whole_seconds();
        assert_eq!(set.check_anchor(anchor, t), Ok(()));
        assert_eq!(set.check_anchor(anchor, until), Ok(()));
        let early = set.check_anchor(anchor, t - 1).unwrap_err();
        assert!(
            early.contains("trust set factory is not valid before"),
            "{early}"
        );
        let late = set.check_anchor(anchor, until + 1).unwrap_err();
        assert!(late.contains("trust set factory expired at"), "{late}");
    }

    /// `issuer` on a label: a certificate issued on another label of the same server (a
    /// wider one, say) is not this label's, whichever label was recorded first.
    #[test]
    fn the_index_keeps_each_label_to_its_own_certificates() {
        let index = IssuanceIndex::new();
        let hex = |der: &[u8]| -> String {
            fingerprint(der)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        index.record(&hex(b"from wide"), Some("wide"));
        index.record(&hex(b"from narrow"), Some("narrow"));
        index.record(&hex(b"unlabeled"), None);
        index.record(&hex(b"narrow again"), Some("narrow"));
        let narrow = [Some("narrow".to_owned())];
        let wide = [Some("wide".to_owned())];
        assert!(index.issued_on(b"from narrow", &narrow));
        assert!(index.issued_on(b"narrow again", &narrow));
        assert!(!index.issued_on(b"from wide", &narrow));
        assert!(index.issued_on(b"from wide", &wide));
        assert!(!index.issued_on(b"from narrow", &wide));
        assert!(index.issued_on(b"unlabeled", &[None]));
        assert!(!index.issued_on(b"unlabeled", &narrow));
        // A group of labels: either counts.
        assert!(index.issued_on(b"from wide", &[Some("narrow".into()), Some("wide".into())]));
        assert!(!index.knows(b"never issued"));
        assert_eq!(index.len(), 4);
        assert!(!index.is_empty());
        assert!(IssuanceIndex::new().is_empty());
    }

    /// Dates in refusals: RFC 3339, UTC; a time out of range as its number.
    #[test]
    fn dates_are_written_in_rfc3339() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(format_unix(i64::MAX), i64::MAX.to_string());
    }
}
