//! Private keys: a PEM file, or a key in a PKCS#11 token named by an RFC 7512 URI. One seam
//! for every signer edge-est has: the local issuer (rcgen's [`rcgen::SigningKey`]) and the TLS
//! server ([`rustls::sign::SigningKey`]).
//!
//! Wherever a key path is configured (`issuers.*.key`, `tls.key`, `upstreams.*.key`), a
//! `pkcs11:` URI may stand instead; the library comes from the URI's `module-path` or the
//! configuration's `pkcs11_module`. A token key is checked at configuration load: the token is found, the PIN
//! logs in, the object exists, its type is one edge-est signs with, and a test signature
//! verifies under the certificate's public key.

pub mod client;
pub mod pkcs11;
pub mod uri;

use std::path::Path;
use std::sync::Arc;

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

pub use pkcs11::TokenKeyKind;
pub use uri::{is_pkcs11, redact, Pkcs11Uri};

/// Why a key could not be used. Every variant names a token key by its URI with the PIN
/// redacted.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("PKCS#11 module {module} cannot be loaded: {reason}")]
    Module { module: String, reason: String },
    #[error("{0}")]
    Uri(String),
    #[error("{uri}: no PKCS#11 module: set pkcs11_module (or module-path= in the URI)")]
    NoModule { uri: String },
    #[error("{uri}: no such token in the module (check token=, serial=, slot-id=)")]
    TokenNotFound { uri: String },
    #[error("{uri}: the token refused the PIN (wrong PIN)")]
    WrongPin { uri: String },
    #[error("{uri}: no private key with this object=/id= on the token")]
    ObjectMissing { uri: String },
    #[error("{uri}: key type unsupported: {what} (edge-est signs with EC P-256, P-384 and RSA)")]
    Unsupported { uri: String, what: String },
    #[error("{uri}: the key does not belong to the certificate ({reason})")]
    Mismatch { uri: String, reason: String },
    #[error("{uri}: {reason}")]
    Token { uri: String, reason: String },
}

/// A configured private key, loaded.
pub enum PrivateKey {
    /// PEM text of a key file (PKCS#8, SEC1 or PKCS#1).
    Pem(String),
    /// A key that stays in its token.
    Token(Arc<TokenKey>),
}

/// A token key checked against its certificate: it signs, edge-est holds no key material.
pub struct TokenKey {
    object: pkcs11::TokenObject,
    /// The certificate's SubjectPublicKeyInfo (DER) and its subjectPublicKey bits.
    spki: Vec<u8>,
    public_key: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("uri", &self.object.shown)
            .field("kind", &self.object.kind)
            .finish()
    }
}

impl TokenKey {
    /// Opens the key `uri` names (through `module`, unless the URI has `module-path`) and
    /// checks it against the first certificate of `chain_pem`.
    pub fn open(
        uri_text: &str,
        module: Option<&Path>,
        chain_pem: &str,
    ) -> Result<Arc<TokenKey>, KeyError> {
        let uri = Pkcs11Uri::parse(uri_text).map_err(KeyError::Uri)?;
        let module = uri
            .module_path
            .as_deref()
            .or(module)
            .ok_or_else(|| KeyError::NoModule {
                uri: uri.shown.clone(),
            })?;
        let mismatch = |reason: String| KeyError::Mismatch {
            uri: uri.shown.clone(),
            reason,
        };
        let cert = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| mismatch("no certificate to check it against".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| mismatch(format!("unparseable certificate: {e}")))?;
        let spki = parsed.public_key();
        let spki_der = spki.raw.to_vec();
        let public_key = spki.subject_public_key.data.to_vec();
        let cert_kind = match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::EC(_)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string());
                match curve.as_deref() {
                    Some("1.2.840.10045.3.1.7") => Some(TokenKeyKind::EcP256),
                    Some("1.3.132.0.34") => Some(TokenKeyKind::EcP384),
                    _ => None,
                }
            }
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Some(TokenKeyKind::Rsa {
                bits: rsa.key_size(),
            }),
            _ => None,
        };

        let object = pkcs11::TokenObject::find(module, &uri)?;
        match (object.kind, cert_kind) {
            (a, Some(b)) if a == b => {}
            (a, b) => {
                return Err(mismatch(format!(
                    "the token holds {}, the certificate's key is {}",
                    kind_name(Some(a)),
                    kind_name(b)
                )))
            }
        }
        let key = TokenKey {
            object,
            spki: spki_der,
            public_key,
        };
        // A test signature, verified under the certificate's key: the same public key is not
        // enough, the token must hold its private half.
        let probe = b"edge-est: does this token key belong to its certificate?";
        let signature = key.sign_default(probe).map_err(|e| KeyError::Token {
            uri: uri.shown.clone(),
            reason: format!("test signature: {e}"),
        })?;
        let algorithm: &dyn aws_lc_rs::signature::VerificationAlgorithm = match key.object.kind {
            TokenKeyKind::EcP256 => &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            TokenKeyKind::EcP384 => &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1,
            TokenKeyKind::Rsa { .. } => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        };
        aws_lc_rs::signature::UnparsedPublicKey::new(algorithm, &key.public_key)
            .verify(probe, &signature)
            .map_err(|_| mismatch("a test signature does not verify under it".into()))?;
        Ok(Arc::new(key))
    }

    /// Generates an EC P-256 key pair inside the token and opens its private half. `uri_text`
    /// names the token and the new key's `object=` (CKA_LABEL) and `id=` (CKA_ID); nothing of
    /// the key leaves the token but its public point.
    pub fn generate(uri_text: &str, module: Option<&Path>) -> Result<Arc<TokenKey>, KeyError> {
        let uri = Pkcs11Uri::parse(uri_text).map_err(KeyError::Uri)?;
        let module = uri
            .module_path
            .as_deref()
            .or(module)
            .ok_or_else(|| KeyError::NoModule {
                uri: uri.shown.clone(),
            })?;
        let (Some(label), Some(id)) = (&uri.object, &uri.id) else {
            return Err(KeyError::Uri(format!(
                "{}: a generated key needs object= and id=",
                uri.shown
            )));
        };
        let point = blocking(|| pkcs11::generate_ec_p256(module, &uri, label, id))?;
        let object = pkcs11::TokenObject::find(module, &uri)?;
        // SubjectPublicKeyInfo of an EC P-256 key: the fixed algorithm prefix, then the point.
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(&point);
        Ok(Arc::new(TokenKey {
            object,
            spki,
            public_key: point,
        }))
    }

    pub fn kind(&self) -> TokenKeyKind {
        self.object.kind
    }

    /// (CKA_SENSITIVE, CKA_EXTRACTABLE) as the token reports them.
    pub fn protection(&self) -> Result<(Option<bool>, Option<bool>), String> {
        self.object.protection().map_err(|e| e.to_string())
    }

    /// The token this key lives on (for tests of the session pool and re-login).
    pub fn token(&self) -> &Arc<pkcs11::Token> {
        &self.object.token
    }

    /// ECDSA with the curve's hash, DER-encoded; RSA PKCS#1 v1.5 with SHA-256.
    fn sign_default(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        blocking(|| self.sign_default_now(message))
    }

    fn sign_default_now(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        match self.object.kind {
            TokenKeyKind::EcP256 | TokenKeyKind::EcP384 => self.sign_ecdsa(message),
            TokenKeyKind::Rsa { .. } => self.sign_rsa(message, false),
        }
    }

    fn sign_ecdsa(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        // Hash here, sign the digest in the token (CKM_ECDSA): every token has it, not every
        // token has CKM_ECDSA_SHA384.
        let digest_alg = match self.object.kind {
            TokenKeyKind::EcP384 => &aws_lc_rs::digest::SHA384,
            _ => &aws_lc_rs::digest::SHA256,
        };
        let digest = aws_lc_rs::digest::digest(digest_alg, message);
        let raw = self
            .object
            .sign(&Mechanism::Ecdsa, digest.as_ref())
            .map_err(|e| format!("{}: {e}", self.object.shown))?;
        ecdsa_der(&raw).ok_or_else(|| format!("{}: malformed ECDSA signature", self.object.shown))
    }

    fn sign_rsa(&self, message: &[u8], pss: bool) -> Result<Vec<u8>, String> {
        let mechanism = if pss {
            Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32.into(),
            })
        } else {
            Mechanism::Sha256RsaPkcs
        };
        self.object
            .sign(&mechanism, message)
            .map_err(|e| format!("{}: {e}", self.object.shown))
    }
}

/// Runs a token operation that may take a while (a TPM signs in tens of milliseconds): on a
/// multi-threaded tokio runtime the worker hands its other tasks off first.
fn blocking<T>(op: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(op)
        }
        _ => op(),
    }
}

fn kind_name(kind: Option<TokenKeyKind>) -> String {
    match kind {
        Some(TokenKeyKind::EcP256) => "an EC P-256 key".into(),
        Some(TokenKeyKind::EcP384) => "an EC P-384 key".into(),
        Some(TokenKeyKind::Rsa { bits }) => format!("an RSA key of {bits} bits"),
        None => "of a type edge-est does not sign with".into(),
    }
}

/// PKCS#11's ECDSA signature (r ‖ s, each the curve's size) as the DER
/// `Ecdsa-Sig-Value` X.509 and TLS carry.
fn ecdsa_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 || raw.len() > 132 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let integer = |v: &[u8]| {
        let first = v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1);
        let v = &v[first..];
        let pad = v[0] & 0x80 != 0;
        let mut out = vec![0x02, (v.len() + usize::from(pad)) as u8];
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body = [integer(r), integer(s)].concat();
    let mut out = vec![0x30];
    if body.len() >= 0x80 {
        out.push(0x81);
    }
    out.push(body.len() as u8);
    out.extend(body);
    Some(out)
}

/// The local issuer's signing key: rcgen's own key pair, or a token key.
pub enum IssuerKey {
    File(KeyPair),
    Token(Arc<TokenKey>),
}

impl PublicKeyData for IssuerKey {
    fn subject_public_key_info(&self) -> Vec<u8> {
        match self {
            IssuerKey::File(k) => k.subject_public_key_info(),
            IssuerKey::Token(k) => k.spki.clone(),
        }
    }

    fn der_bytes(&self) -> &[u8] {
        match self {
            IssuerKey::File(k) => k.der_bytes(),
            IssuerKey::Token(k) => &k.public_key,
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            IssuerKey::File(k) => k.algorithm(),
            IssuerKey::Token(k) => match k.object.kind {
                TokenKeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                TokenKeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                TokenKeyKind::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
            },
        }
    }
}

impl rcgen::SigningKey for IssuerKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            IssuerKey::File(k) => k.sign(msg),
            IssuerKey::Token(k) => k.sign_default(msg).map_err(|e| {
                tracing::error!(error = %e, "the issuing key's token failed to sign");
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

/// The TLS server's certificate and key, for rustls. A PEM key is parsed by the crypto
/// provider; a token key signs through the token.
pub fn tls_certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKey,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, String> {
    match key {
        PrivateKey::Pem(pem) => {
            let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| format!("tls.key: unreadable private key: {e}"))?;
            CertifiedKey::from_der(chain, der, provider)
                .map_err(|e| format!("tls: certificate and key do not fit together: {e}"))
        }
        // Checked against the certificate when it was opened.
        PrivateKey::Token(token) => Ok(CertifiedKey::new(
            chain,
            Arc::new(TlsTokenKey(token.clone())),
        )),
    }
}

#[derive(Debug)]
struct TlsTokenKey(Arc<TokenKey>);

impl rustls::sign::SigningKey for TlsTokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        let wanted: &[SignatureScheme] = match self.0.object.kind {
            TokenKeyKind::EcP256 => &[SignatureScheme::ECDSA_NISTP256_SHA256],
            TokenKeyKind::EcP384 => &[SignatureScheme::ECDSA_NISTP384_SHA384],
            // PSS first: TLS 1.3 allows nothing else for RSA.
            TokenKeyKind::Rsa { .. } => &[
                SignatureScheme::RSA_PSS_SHA256,
                SignatureScheme::RSA_PKCS1_SHA256,
            ],
        };
        let scheme = wanted.iter().find(|s| offered.contains(s))?;
        Some(Box::new(TlsTokenSigner {
            key: self.0.clone(),
            scheme: *scheme,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.spki.as_slice()))
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        match self.0.object.kind {
            TokenKeyKind::Rsa { .. } => rustls::SignatureAlgorithm::RSA,
            _ => rustls::SignatureAlgorithm::ECDSA,
        }
    }
}

#[derive(Debug)]
struct TlsTokenSigner {
    key: Arc<TokenKey>,
    scheme: SignatureScheme,
}

impl rustls::sign::Signer for TlsTokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let signed = blocking(|| match self.scheme {
            SignatureScheme::RSA_PSS_SHA256 => self.key.sign_rsa(message, true),
            SignatureScheme::RSA_PKCS1_SHA256 => self.key.sign_rsa(message, false),
            _ => self.key.sign_ecdsa(message),
        });
        signed.map_err(|e| {
            tracing::error!(error = %e, "the TLS key's token failed to sign");
            rustls::Error::General("the TLS key's token failed to sign".into())
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_der_encodes_like_aws_lc() {
        // r with its top bit set (needs a 0x00), s with leading zero octets (stripped).
        let mut raw = vec![0x80u8; 32];
        raw.extend([0u8, 0, 0x01].iter().chain(&[0x22u8; 29]));
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(&der[..4], &[0x30, 4 + 33 + 30, 0x02, 33]);
        assert_eq!(der[4], 0);
        assert_eq!(&der[4 + 33..4 + 33 + 3], &[0x02, 30, 0x01]);
        assert!(ecdsa_der(&[1, 2, 3]).is_none());
        assert!(ecdsa_der(&[]).is_none());
    }
}
