//! The EST protocol (RFC 7030 with RFC 8951), free of I/O and of IoT Edge: routing of
//! `/.well-known/est` paths, media types, request body decoding, CSR parsing and proof of
//! possession, and the encodings of the answers (certs-only PKCS#7, csrattrs, multipart).

pub mod body;
pub mod csr;
pub mod csrattrs;
pub mod media;
pub mod multipart;
pub mod name;
pub mod names;
pub mod pkcs7;
pub mod route;

pub use csr::{Csr, KeyKind};
pub use name::{SanEntry, Subject};
pub use route::{Label, Operation};

/// A request that is malformed at the protocol level. Every variant becomes a 4xx answer whose
/// text is the variant's message, so messages say what was wrong and never echo secrets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("the request body is empty")]
    EmptyBody,
    #[error("the request body is not valid base64: {0}")]
    Base64(String),
    #[error("the request body is not a PKCS#10 certificate request: {0}")]
    MalformedCsr(String),
    #[error("the CSR's signature does not verify: no proof of possession of its key")]
    BadCsrSignature,
    #[error("the CSR's key is not accepted: {0}")]
    UnsupportedKey(String),
    #[error("the CSR's signature algorithm is not accepted: {0}")]
    UnsupportedSignatureAlgorithm(String),
    /// A requested name that is not well-formed (`names`): control characters, a DNS name
    /// that is not LDH, a CN over 64 characters, ...
    #[error("the CSR asks for a malformed name: {0}")]
    Name(#[from] names::NameError),
    #[error("malformed PKCS#7 certs-only message: {0}")]
    MalformedPkcs7(String),
}
