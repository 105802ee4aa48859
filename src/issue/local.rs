//! The local issuing backend: a delegated intermediate CA whose certificate chain and key
//! this instance holds, signing with rcgen.

use std::net::IpAddr;

use ::time::OffsetDateTime;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, DnValue,
    GeneralSubtree, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, NameConstraints,
    PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::*;

use super::profile::{Profile, ProfileClass};
use super::{IssueError, Issued};
use crate::auth::client_cert::hex;
use crate::est::name::AttributeType;
use crate::est::{KeyKind, SanEntry, Subject};
use crate::keys::IssuerKey;

/// Issued certificates start this long before "now", for devices whose clocks lag.
const BACKDATE: ::time::Duration = ::time::Duration::minutes(5);

pub struct LocalIssuer {
    issuer: Issuer<'static, IssuerKey>,
    /// The issuing CA certificate first, up to and including the root.
    chain: Vec<CertificateDer<'static>>,
    subject: Subject,
    not_after: OffsetDateTime,
    /// The CA's own path length constraint (None: unconstrained).
    path_len: Option<u32>,
    /// SHA-256 of the CA certificate, lowercase hex (journaled with what it signs).
    ca_sha256: String,
}

impl LocalIssuer {
    /// Loads and checks an issuing CA: its chain (issuing certificate first, root last) and
    /// its private key.
    pub fn load(chain_pem: &str, key_pem: &str) -> Result<LocalIssuer, String> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| format!("key: unreadable private key: {e}"))?;
        Self::load_with(chain_pem, IssuerKey::File(key))
    }

    /// [`LocalIssuer::load`] with a key already opened: a key file's or a token's (a token
    /// key was checked against the certificate when it was opened).
    pub fn load_with(chain_pem: &str, key: IssuerKey) -> Result<LocalIssuer, String> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("certificate: not PEM certificates: {e}"))?;
        let ca_der = chain.first().ok_or("certificate: holds no certificate")?;
        let parsed: Vec<X509Certificate<'_>> = chain
            .iter()
            .map(|c| X509Certificate::from_der(c).map(|(_, x)| x))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: unparseable certificate: {e}"))?;
        let ca = &parsed[0];

        let constraints = ca
            .basic_constraints()
            .map_err(|e| format!("certificate: malformed basicConstraints: {e}"))?
            .map(|ext| ext.value.clone());
        let path_len =
            match constraints {
                Some(bc) if bc.ca => bc.path_len_constraint,
                _ => return Err(
                    "certificate: the issuing certificate is not a CA (basicConstraints CA:TRUE)"
                        .into(),
                ),
            };
        if let Ok(Some(ku)) = ca.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(
                    "certificate: the issuing certificate's keyUsage lacks keyCertSign".into(),
                );
            }
        }
        let subject = Subject::from_x509_name(ca.subject())
            .map_err(|e| format!("certificate: subject: {e}"))?;
        if subject.has_repeated_types() || subject.is_multi_valued() {
            // rcgen re-encodes the issuer name from a map of attribute types: a repeated type
            // (DC=contoso,DC=com) would be collapsed and issued certificates would not chain.
            return Err(format!(
                "certificate: the issuing CA's subject \"{subject}\" repeats an attribute type or has a \
                 multi-valued RDN, which edge-est cannot reproduce exactly as an issuer name"
            ));
        }
        for pair in parsed.windows(2) {
            if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
                return Err(format!(
                    "certificate: chain out of order: \"{}\" is not issued by the next certificate \"{}\"",
                    pair[0].subject(),
                    pair[1].subject()
                ));
            }
        }
        let last = &parsed[parsed.len() - 1];
        if last.issuer().as_raw() != last.subject().as_raw() {
            return Err(format!(
                "certificate: the chain must end with its root; \"{}\" is issued by \"{}\", which is missing",
                last.subject(),
                last.issuer()
            ));
        }
        let not_after = ca.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(format!(
                "certificate: the issuing CA expired at {not_after}"
            ));
        }

        if key.subject_public_key_info() != ca.public_key().raw {
            return Err("key: does not belong to the issuing CA certificate".into());
        }
        let issuer =
            Issuer::from_ca_cert_der(ca_der, key).map_err(|e| format!("certificate: {e}"))?;
        Ok(LocalIssuer {
            issuer,
            subject,
            not_after,
            path_len,
            ca_sha256: hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ca_der).as_ref()),
            chain: chain.clone(),
        })
    }

    /// SHA-256 of the issuing CA certificate, lowercase hex.
    pub fn ca_sha256(&self) -> &str {
        &self.ca_sha256
    }

    /// The issuing chain, issuing CA first, root last: what `/cacerts` returns.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The CA's own path length constraint (None: unconstrained).
    pub fn path_len(&self) -> Option<u32> {
        self.path_len
    }

    /// Whether this CA may issue CA certificates with the given path length.
    pub fn can_issue_ca(&self, path_len: u8) -> bool {
        self.path_len.is_none_or(|own| own > u32::from(path_len))
    }

    /// Signs a certificate for `spki_der` (a SubjectPublicKeyInfo) with the granted subject and
    /// names, shaped by `profile`.
    pub fn issue(
        &self,
        subject: &Subject,
        sans: &[SanEntry],
        spki_der: &[u8],
        key: KeyKind,
        profile: &Profile,
    ) -> Result<Issued, IssueError> {
        let now = OffsetDateTime::now_utc();
        let not_before = now - BACKDATE;
        let not_after = (now + profile.validity).min(self.not_after);
        if not_after <= now {
            return Err(IssueError::IssuerExpired);
        }
        let serial = random_serial().map_err(IssueError::Sign)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(subject)?;
        params.subject_alt_names = sans.iter().map(san_type).collect::<Result<_, _>>()?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        match &profile.class {
            ProfileClass::Ca { path_len } => {
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(*path_len));
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                ];
            }
            ProfileClass::SubCa(granted) => {
                // Checked by the server first (a refusal); here so no path ever signs one.
                if !self.can_issue_ca(granted.path_len) {
                    return Err(IssueError::Sign(format!(
                        "this issuing CA cannot sign a CA with pathlen {}",
                        granted.path_len
                    )));
                }
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(granted.path_len));
                params.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                    KeyUsagePurpose::CrlSign,
                ];
                params.name_constraints = Some(name_constraints(granted)?);
            }
            ProfileClass::EndEntity { extended_key_usage } => {
                params.is_ca = IsCa::ExplicitNoCa;
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                if matches!(key, KeyKind::Rsa { .. }) {
                    // TLS 1.2 RSA key exchange needs it; harmless otherwise.
                    params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
                }
                params.extended_key_usages = extended_key_usage.clone();
            }
        }
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let cert = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let der = cert.der().to_vec();
        let sha256 = hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der).as_ref());
        Ok(Issued {
            der,
            serial: hex(&serial),
            not_before,
            not_after,
            sha256,
        })
    }
}

/// What a sub-CA may name below it: the granted DNS subtrees and directoryName; no IP
/// address at all (its RA's rule allows none, see `policy`).
fn name_constraints(granted: &crate::policy::SubCa) -> Result<NameConstraints, IssueError> {
    let mut permitted: Vec<GeneralSubtree> = granted
        .dns
        .iter()
        .map(|d| GeneralSubtree::DnsName(d.clone()))
        .collect();
    if let Some(dn) = &granted.directory_name {
        permitted.push(GeneralSubtree::DirectoryName(distinguished_name(dn)?));
    }
    Ok(NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ],
    })
}

/// 20 random octets (RFC 5280's maximum), first octet in 0x01..=0x7f so that the INTEGER is
/// positive and keeps all 20 octets: 159 bits of randomness.
fn random_serial() -> Result<[u8; 20], String> {
    use aws_lc_rs::rand::SecureRandom;
    let mut serial = [0u8; 20];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| "no randomness available".to_owned())?;
    serial[0] = (serial[0] & 0x7f).max(1);
    Ok(serial)
}

fn distinguished_name(subject: &Subject) -> Result<DistinguishedName, IssueError> {
    let mut dn = DistinguishedName::new();
    for (kind, value) in subject.attributes() {
        let (dn_type, dn_value) = match kind {
            AttributeType::CommonName => (DnType::CommonName, utf8(value)),
            AttributeType::Organization => (DnType::OrganizationName, utf8(value)),
            AttributeType::OrganizationalUnit => (DnType::OrganizationalUnitName, utf8(value)),
            AttributeType::Country => (DnType::CountryName, printable(value)?),
            AttributeType::State => (DnType::StateOrProvinceName, utf8(value)),
            AttributeType::Locality => (DnType::LocalityName, utf8(value)),
            AttributeType::DomainComponent => (
                DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 25]),
                ia5(value)?,
            ),
            AttributeType::SerialNumber => {
                (DnType::CustomDnType(vec![2, 5, 4, 5]), printable(value)?)
            }
            AttributeType::EmailAddress => (
                DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
                ia5(value)?,
            ),
            AttributeType::Other(oid) => (DnType::CustomDnType(parse_oid(oid)?), utf8(value)),
        };
        dn.push(dn_type, dn_value);
    }
    Ok(dn)
}

fn utf8(value: &str) -> DnValue {
    DnValue::Utf8String(value.to_owned())
}

fn printable(value: &str) -> Result<DnValue, IssueError> {
    rcgen::string::PrintableString::try_from(value)
        .map(DnValue::PrintableString)
        .map_err(|_| IssueError::Subject(format!("{value:?} is not a PrintableString")))
}

fn ia5(value: &str) -> Result<DnValue, IssueError> {
    rcgen::string::Ia5String::try_from(value)
        .map(DnValue::Ia5String)
        .map_err(|_| IssueError::Subject(format!("{value:?} is not ASCII")))
}

fn parse_oid(oid: &str) -> Result<Vec<u64>, IssueError> {
    oid.split('.')
        .map(|arc| arc.parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| IssueError::Subject(format!("bad attribute type {oid:?}")))
}

fn san_type(san: &SanEntry) -> Result<SanType, IssueError> {
    let ia5 = |s: &str| {
        rcgen::string::Ia5String::try_from(s)
            .map_err(|_| IssueError::San(format!("{s:?} is not ASCII")))
    };
    Ok(match san {
        SanEntry::Dns(name) => SanType::DnsName(ia5(name)?),
        SanEntry::Ip(ip) => SanType::IpAddress(*ip as IpAddr),
        SanEntry::Uri(uri) => SanType::URI(ia5(uri)?),
        SanEntry::Email(email) => SanType::Rfc822Name(ia5(email)?),
        SanEntry::Other(what) => return Err(IssueError::San(format!("{what} cannot be issued"))),
    })
}

/// A CSR for a key made here (serverkeygen on a forwarding label), asking for exactly what was
/// granted: the upstream sees a request like any other, signed by the key it certifies.
pub fn request_for(grant: &crate::policy::Grant, key: &KeyPair) -> Result<Vec<u8>, IssueError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&grant.subject)?;
    params.subject_alt_names = grant.sans.iter().map(san_type).collect::<Result<_, _>>()?;
    if grant.ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    }
    params
        .serialize_request(key)
        .map(|csr| csr.der().to_vec())
        .map_err(|e| IssueError::Sign(e.to_string()))
}
