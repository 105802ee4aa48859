//! PKCS#10 certificate requests: parsing, key policy and proof of possession.
//!
//! x509-parser does the parsing (rcgen's CSR parser refuses any unknown requested extension) and
//! aws-lc-rs verifies the signature over the raw `certificationRequestInfo` bytes. Requested
//! extensions are reported, never enforced here: the issuing policy decides what to honour.

use std::fmt;

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use der::asn1::UintRef;
use der::Decode;
use x509_parser::asn1_rs::{Any, Class, Oid, Tag};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::{ExtensionRequest, ParsedCriAttribute};
use x509_parser::error::X509Error;
use x509_parser::extensions::{ParsedExtension, X509Extension};
use x509_parser::objects::{oid2sn, oid_registry};
use x509_parser::prelude::FromDer;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use super::name::{
    check_name, der_elements, dotted_oid, expect_tag, sans_from_general_names, SanEntry, Subject,
    Tlv, TAG_BIT_STRING, TAG_BOOLEAN, TAG_CONTEXT_0, TAG_CONTEXT_4, TAG_INTEGER, TAG_OCTET_STRING,
    TAG_OID, TAG_SEQUENCE, TAG_SET,
};
use super::ProtocolError;

const ACCEPTED_KEYS: &str = "accepted: RSA 2048–4096, ECDSA P-256/P-384, Ed25519";
const ACCEPTED_SIGNATURES: &str =
    "accepted: sha256/384/512WithRSAEncryption, ecdsa-with-SHA256/384/512, Ed25519";

const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_EXTENSION_REQUEST: &str = "1.2.840.113549.1.9.14";
const OID_CHALLENGE_PASSWORD: &str = "1.2.840.113549.1.9.7";
/// Contents octets of the namedCurve OIDs prime256v1 (1.2.840.10045.3.1.7) and secp384r1
/// (1.3.132.0.34), compared directly against the SPKI algorithm parameters.
const CURVE_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const CURVE_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
/// Contents octets of the OIDs whose values [`check_request_info`] looks into:
/// extensionRequest (1.2.840.113549.1.9.14), extKeyUsage (2.5.29.37), subjectAltName (2.5.29.17).
const OID_BYTES_EXTENSION_REQUEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e];
const OID_BYTES_EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
const OID_BYTES_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The kind of key in a CSR; only accepted kinds exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyKind {
    Rsa { bits: u32 },
    EcP256,
    EcP384,
    Ed25519,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA-{bits}"),
            KeyKind::EcP256 => f.write_str("EC P-256"),
            KeyKind::EcP384 => f.write_str("EC P-384"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// A basicConstraints extension as requested in a CSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestedBasicConstraints {
    pub ca: bool,
    pub path_len: Option<u32>,
}

/// A parsed PKCS#10 request whose signature has been verified with its own key.
#[derive(Clone)]
pub struct Csr {
    der: Vec<u8>,
    subject: Subject,
    spki_der: Vec<u8>,
    key: KeyKind,
    signature_algorithm: &'static str,
    sans: Vec<SanEntry>,
    requested_ca: Option<RequestedBasicConstraints>,
    key_cert_sign: bool,
    eku: Vec<String>,
    challenge_password: Option<String>,
    extension_oids: Vec<String>,
}

// Written by hand so that the challenge password never reaches a log through `{:?}`.
impl fmt::Debug for Csr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Csr")
            .field("subject", &self.subject.to_string())
            .field("key", &self.key)
            .field("signature_algorithm", &self.signature_algorithm)
            .field("sans", &self.sans)
            .field("requested_ca", &self.requested_ca)
            .field("key_cert_sign", &self.key_cert_sign)
            .field("eku", &self.eku)
            .field(
                "challenge_password",
                &self.challenge_password.as_ref().map(|_| "<redacted>"),
            )
            .field("extension_oids", &self.extension_oids)
            .finish_non_exhaustive()
    }
}

impl Csr {
    /// Parses a DER CSR, applies the key policy and verifies the proof of possession.
    pub fn from_der(der: &[u8]) -> Result<Csr, ProtocolError> {
        if der.is_empty() {
            return Err(malformed("it is empty"));
        }
        let (rest, req) = match X509CertificationRequest::from_der(der) {
            Ok(parsed) => parsed,
            Err(err) => return Err(malformed(describe_parse_error(der, err))),
        };
        if !rest.is_empty() {
            return Err(malformed(format!(
                "trailing data after the request ({} bytes)",
                rest.len()
            )));
        }
        let info = &req.certification_request_info;
        check_request_info(info.raw).map_err(malformed)?;
        if info.version.0 != 0 {
            return Err(malformed(format!(
                "its version is {}, not v1 (0)",
                info.version.0
            )));
        }

        let (key, key_bytes) = check_key(&info.subject_pki)?;
        let (sig_alg, sig_name) = signature_algorithm(&req.signature_algorithm)?;
        let verifier = verification_algorithm(sig_alg, key).ok_or_else(|| {
            ProtocolError::UnsupportedSignatureAlgorithm(format!(
                "{sig_name} cannot be used with an {key} key"
            ))
        })?;
        if req.signature_value.unused_bits != 0 {
            return Err(malformed("its signature BIT STRING has unused bits"));
        }
        check_envelope(der).map_err(malformed)?;
        UnparsedPublicKey::new(verifier, key_bytes)
            .verify(info.raw, &req.signature_value.data)
            .map_err(|_| ProtocolError::BadCsrSignature)?;

        let subject = Subject::from_x509_name(&info.subject).map_err(malformed)?;
        let mut csr = Csr {
            der: der.to_vec(),
            subject,
            spki_der: info.subject_pki.raw.to_vec(),
            key,
            signature_algorithm: sig_name,
            sans: Vec::new(),
            requested_ca: None,
            key_cert_sign: false,
            eku: Vec::new(),
            challenge_password: None,
            extension_oids: Vec::new(),
        };
        csr.read_attributes(&req)?;
        // Every name is well-formed before any policy looks at it (`names`).
        super::names::check_requested_names(&csr.subject, &csr.sans)?;
        Ok(csr)
    }

    fn read_attributes(&mut self, req: &X509CertificationRequest<'_>) -> Result<(), ProtocolError> {
        // x509-parser reads only the first value of an attribute; both of these are
        // single-valued (PKCS#9), so a second value is refused rather than silently dropped.
        for raw in raw_attributes(req.as_raw()).map_err(malformed)? {
            let oid = dotted_oid(&raw.oid)
                .ok_or_else(|| malformed("one of its attributes has a malformed OID"))?;
            if (oid == OID_EXTENSION_REQUEST || oid == OID_CHALLENGE_PASSWORD)
                && raw.values.len() != 1
            {
                return Err(malformed(format!(
                    "its {} attribute has {} values instead of one",
                    attribute_name(&raw.oid),
                    raw.values.len()
                )));
            }
        }

        let mut seen_extension_request = false;
        for attr in req.certification_request_info.iter_attributes() {
            match attr.parsed_attribute() {
                ParsedCriAttribute::ExtensionRequest(request) => {
                    if seen_extension_request {
                        return Err(malformed("it has more than one extensionRequest attribute"));
                    }
                    seen_extension_request = true;
                    self.read_extension_request(request)?;
                }
                ParsedCriAttribute::ChallengePassword(password) => {
                    if self.challenge_password.is_some() {
                        return Err(malformed(
                            "it has more than one challengePassword attribute",
                        ));
                    }
                    self.challenge_password = Some(password.0.clone());
                }
                // Other attributes (unstructuredName, Microsoft's) carry nothing we act on.
                ParsedCriAttribute::UnsupportedAttribute => {}
            }
        }
        Ok(())
    }

    fn read_extension_request(
        &mut self,
        request: &ExtensionRequest<'_>,
    ) -> Result<(), ProtocolError> {
        for ext in &request.extensions {
            let oid = dotted_oid(&ext.oid)
                .ok_or_else(|| malformed("a requested extension has a malformed OID"))?;
            if self.extension_oids.contains(&oid) {
                return Err(malformed(format!(
                    "its extensionRequest asks for {} twice",
                    extension_name(&ext.oid)
                )));
            }
            self.extension_oids.push(oid);
            match ext.parsed_extension() {
                ParsedExtension::ParseError { .. } => {
                    return Err(malformed(format!(
                        "the requested {} extension is malformed",
                        extension_name(&ext.oid)
                    )));
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    self.sans = sans_from_general_names(&san.general_names);
                }
                ParsedExtension::BasicConstraints(bc) => {
                    self.requested_ca = Some(RequestedBasicConstraints {
                        ca: bc.ca,
                        path_len: bc.path_len_constraint,
                    });
                }
                ParsedExtension::KeyUsage(ku) => self.key_cert_sign = ku.key_cert_sign(),
                ParsedExtension::ExtendedKeyUsage(_) => {
                    // Read again: x509-parser folds known EKUs into flags and loses their order.
                    self.eku = eku_oids(ext.value).ok_or_else(|| {
                        malformed("the requested extKeyUsage extension is malformed")
                    })?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The whole CSR as received (DER).
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The requested subject.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The full SubjectPublicKeyInfo DER (input to `rcgen::SubjectPublicKeyInfo::from_der`).
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The kind and size of the requested key.
    pub fn key(&self) -> KeyKind {
        self.key
    }

    /// The name of the algorithm the CSR was signed with, e.g. `ecdsa-with-SHA256`.
    pub fn signature_algorithm(&self) -> &'static str {
        self.signature_algorithm
    }

    /// The requested subject alternative names, in encoded order; empty when none requested.
    pub fn sans(&self) -> &[SanEntry] {
        &self.sans
    }

    /// The requested basicConstraints; `None` when the extension was not requested.
    pub fn requested_ca(&self) -> Option<RequestedBasicConstraints> {
        self.requested_ca
    }

    /// Whether a requested keyUsage includes keyCertSign.
    pub fn requested_key_usage_cert_sign(&self) -> bool {
        self.key_cert_sign
    }

    /// The requested extended key usages as dotted OIDs, in encoded order.
    pub fn requested_eku(&self) -> &[String] {
        &self.eku
    }

    /// The PKCS#9 challengePassword, if any. A secret: never log it.
    pub fn challenge_password(&self) -> Option<&str> {
        self.challenge_password.as_deref()
    }

    /// The dotted OIDs of every requested extension, in encoded order (for logging what the
    /// issuing policy ignores).
    pub fn requested_extension_oids(&self) -> &[String] {
        &self.extension_oids
    }
}

/// The OIDs of an ExtKeyUsageSyntax (SEQUENCE OF KeyPurposeId), in order.
fn eku_oids(value: &[u8]) -> Option<Vec<String>> {
    let (rest, sequence) = Any::from_der(value).ok()?;
    if !rest.is_empty() || sequence.class() != Class::Universal || sequence.tag() != Tag::Sequence {
        return None;
    }
    let mut oids = Vec::new();
    let mut content = sequence.data;
    while !content.is_empty() {
        let (next, oid) = oid_from_der(content)?;
        oids.push(dotted_oid(&oid)?);
        content = next;
    }
    Some(oids)
}

/// Reads an OBJECT IDENTIFIER, checking its tag: asn1-rs's `Oid::from_der` takes any primitive
/// element for one.
fn oid_from_der(input: &[u8]) -> Option<(&[u8], Oid<'_>)> {
    if input.first() != Some(&TAG_OID) {
        return None;
    }
    Oid::from_der(input).ok()
}

fn malformed(why: impl Into<String>) -> ProtocolError {
    ProtocolError::MalformedCsr(why.into())
}

mod keys;
mod structure;

use keys::*;
use structure::*;
#[cfg(test)]
mod tests;
