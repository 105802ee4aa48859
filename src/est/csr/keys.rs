//! Which keys and signature algorithms a CSR may use, and the checks of its public key.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SignatureAlgorithm {
    RsaPkcs1(Hash),
    Ecdsa(Hash),
    Ed25519,
}

/// Maps the signature AlgorithmIdentifier to an accepted algorithm and its name.
pub(super) fn signature_algorithm(
    alg: &AlgorithmIdentifier<'_>,
) -> Result<(SignatureAlgorithm, &'static str), ProtocolError> {
    use SignatureAlgorithm::{Ecdsa, Ed25519, RsaPkcs1};
    let oid = dotted_oid(&alg.algorithm)
        .ok_or_else(|| malformed("its signature algorithm OID is malformed"))?;
    let (accepted, name) = match oid.as_str() {
        "1.2.840.113549.1.1.11" => (RsaPkcs1(Hash::Sha256), "sha256WithRSAEncryption"),
        "1.2.840.113549.1.1.12" => (RsaPkcs1(Hash::Sha384), "sha384WithRSAEncryption"),
        "1.2.840.113549.1.1.13" => (RsaPkcs1(Hash::Sha512), "sha512WithRSAEncryption"),
        "1.2.840.10045.4.3.2" => (Ecdsa(Hash::Sha256), "ecdsa-with-SHA256"),
        "1.2.840.10045.4.3.3" => (Ecdsa(Hash::Sha384), "ecdsa-with-SHA384"),
        "1.2.840.10045.4.3.4" => (Ecdsa(Hash::Sha512), "ecdsa-with-SHA512"),
        OID_ED25519 => (Ed25519, "Ed25519"),
        _ => {
            let name = match oid.as_str() {
                "1.2.840.113549.1.1.2" => "md2WithRSAEncryption".to_owned(),
                "1.2.840.113549.1.1.4" => "md5WithRSAEncryption".to_owned(),
                "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption".to_owned(),
                "1.2.840.113549.1.1.14" => "sha224WithRSAEncryption".to_owned(),
                "1.2.840.113549.1.1.10" => "RSASSA-PSS".to_owned(),
                "1.2.840.10045.4.1" => "ecdsa-with-SHA1".to_owned(),
                "1.2.840.10045.4.3.1" => "ecdsa-with-SHA224".to_owned(),
                "1.2.840.10040.4.3" => "dsa-with-sha1".to_owned(),
                "2.16.840.1.101.3.4.3.2" => "dsa-with-sha256".to_owned(),
                "1.3.101.113" => "Ed448".to_owned(),
                _ => oid_name(&alg.algorithm),
            };
            return Err(ProtocolError::UnsupportedSignatureAlgorithm(format!(
                "{name} ({oid}); {ACCEPTED_SIGNATURES}"
            )));
        }
    };
    // RFC 4055 wants NULL for PKCS#1 v1.5 and RFC 5758/8410 want nothing for ECDSA/EdDSA;
    // both forms are seen in the field and the parameters are not covered by the signature.
    if !params_absent_or_null(alg.parameters.as_ref()) {
        return Err(malformed(format!(
            "its {name} signature algorithm has unexpected parameters"
        )));
    }
    Ok((accepted, name))
}

pub(super) fn verification_algorithm(
    alg: SignatureAlgorithm,
    key: KeyKind,
) -> Option<&'static dyn VerificationAlgorithm> {
    use SignatureAlgorithm::{Ecdsa, Ed25519, RsaPkcs1};
    Some(match (alg, key) {
        (RsaPkcs1(Hash::Sha256), KeyKind::Rsa { .. }) => &signature::RSA_PKCS1_2048_8192_SHA256,
        (RsaPkcs1(Hash::Sha384), KeyKind::Rsa { .. }) => &signature::RSA_PKCS1_2048_8192_SHA384,
        (RsaPkcs1(Hash::Sha512), KeyKind::Rsa { .. }) => &signature::RSA_PKCS1_2048_8192_SHA512,
        (Ecdsa(Hash::Sha256), KeyKind::EcP256) => &signature::ECDSA_P256_SHA256_ASN1,
        (Ecdsa(Hash::Sha384), KeyKind::EcP256) => &signature::ECDSA_P256_SHA384_ASN1,
        (Ecdsa(Hash::Sha512), KeyKind::EcP256) => &signature::ECDSA_P256_SHA512_ASN1,
        (Ecdsa(Hash::Sha256), KeyKind::EcP384) => &signature::ECDSA_P384_SHA256_ASN1,
        (Ecdsa(Hash::Sha384), KeyKind::EcP384) => &signature::ECDSA_P384_SHA384_ASN1,
        (Ecdsa(Hash::Sha512), KeyKind::EcP384) => &signature::ECDSA_P384_SHA512_ASN1,
        (Ed25519, KeyKind::Ed25519) => &signature::ED25519,
        _ => return None,
    })
}

pub(super) fn params_absent_or_null(params: Option<&Any<'_>>) -> bool {
    match params {
        None => true,
        Some(any) => {
            any.class() == Class::Universal && any.tag() == Tag::Null && any.data.is_empty()
        }
    }
}

/// The PKCS#1 RSAPublicKey inside an rsaEncryption SPKI's BIT STRING.
#[derive(der::Sequence)]
pub(super) struct RsaPublicKey<'a> {
    pub(super) modulus: UintRef<'a>,
    pub(super) public_exponent: UintRef<'a>,
}

/// Applies the key policy; returns the key kind and the bytes aws-lc-rs verifies with (the
/// SPKI BIT STRING contents: PKCS#1 RSAPublicKey, EC point or raw Ed25519 key).
pub(super) fn check_key<'a>(
    spki: &'a SubjectPublicKeyInfo<'_>,
) -> Result<(KeyKind, &'a [u8]), ProtocolError> {
    if spki.subject_public_key.unused_bits != 0 {
        return Err(malformed("its public key BIT STRING has unused bits"));
    }
    let key: &[u8] = &spki.subject_public_key.data;
    let params = spki.algorithm.parameters.as_ref();
    let oid = dotted_oid(&spki.algorithm.algorithm)
        .ok_or_else(|| malformed("its public key algorithm OID is malformed"))?;
    let kind = match oid.as_str() {
        OID_RSA_ENCRYPTION => {
            if !params_absent_or_null(params) {
                return Err(malformed("its rsaEncryption key has unexpected parameters"));
            }
            check_rsa_key(key)?
        }
        OID_EC_PUBLIC_KEY => check_ec_key(params, key)?,
        OID_ED25519 => {
            // RFC 8410: the parameters MUST be absent.
            if params.is_some() {
                return Err(malformed("its Ed25519 key has parameters"));
            }
            if key.len() != 32 {
                return Err(malformed(format!(
                    "its Ed25519 key is {} bytes long instead of 32",
                    key.len()
                )));
            }
            KeyKind::Ed25519
        }
        _ => {
            let name = match oid.as_str() {
                "1.2.840.113549.1.1.10" => "RSASSA-PSS".to_owned(),
                "1.2.840.10040.4.1" => "DSA".to_owned(),
                "1.3.101.113" => "Ed448".to_owned(),
                _ => oid_name(&spki.algorithm.algorithm),
            };
            return Err(ProtocolError::UnsupportedKey(format!(
                "{name} key ({oid}); {ACCEPTED_KEYS}"
            )));
        }
    };
    Ok((kind, key))
}

pub(super) fn check_rsa_key(key: &[u8]) -> Result<KeyKind, ProtocolError> {
    let rsa = RsaPublicKey::from_der(key)
        .map_err(|_| malformed("its RSA public key is not a valid RSAPublicKey"))?;
    let bits = bit_length(rsa.modulus.as_bytes());
    if !(2048..=4096).contains(&bits) {
        return Err(ProtocolError::UnsupportedKey(format!(
            "RSA {bits} bits; {ACCEPTED_KEYS}"
        )));
    }
    // aws-lc refuses exponents over 33 bits at verification time; say so plainly instead of
    // reporting a bad signature. An even exponent or 1 cannot be a valid RSA key.
    let exponent_bits = bit_length(rsa.public_exponent.as_bytes());
    if exponent_bits > 33 {
        return Err(ProtocolError::UnsupportedKey(format!(
            "RSA public exponent of {exponent_bits} bits (at most 33 accepted)"
        )));
    }
    let exponent = rsa
        .public_exponent
        .as_bytes()
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    if exponent < 3 || exponent % 2 == 0 {
        return Err(ProtocolError::UnsupportedKey(format!(
            "RSA public exponent {exponent} (must be odd and at least 3)"
        )));
    }
    // 2048..=4096 was checked above, so this never saturates.
    Ok(KeyKind::Rsa {
        bits: u32::try_from(bits).unwrap_or(u32::MAX),
    })
}

pub(super) fn check_ec_key(
    params: Option<&Any<'_>>,
    point: &[u8],
) -> Result<KeyKind, ProtocolError> {
    let curve = match params {
        Some(any) if any.class() == Class::Universal && any.tag() == Tag::Oid => any.data,
        _ => {
            return Err(ProtocolError::UnsupportedKey(format!(
                "EC key without a named curve; {ACCEPTED_KEYS}"
            )))
        }
    };
    let (kind, coordinate_len) = if curve == CURVE_P256 {
        (KeyKind::EcP256, 32)
    } else if curve == CURVE_P384 {
        (KeyKind::EcP384, 48)
    } else {
        let oid = Oid::new(curve.into());
        return Err(ProtocolError::UnsupportedKey(format!(
            "EC curve {}; {ACCEPTED_KEYS}",
            oid_name(&oid)
        )));
    };
    match point.first() {
        // Compressed points would verify here, but rustls/webpki (ring-style APIs) accept only
        // uncompressed ones, so a certificate for such a key could not authenticate to us.
        Some(2 | 3) => Err(ProtocolError::UnsupportedKey(format!(
            "{kind} key as a compressed point; uncompressed points only"
        ))),
        Some(4) if point.len() == 1 + 2 * coordinate_len => Ok(kind),
        _ => Err(malformed(format!(
            "its {kind} public key is not a valid point"
        ))),
    }
}

/// Number of significant bits of a big-endian unsigned integer.
pub(super) fn bit_length(be: &[u8]) -> u64 {
    let mut digits = be.iter().skip_while(|&&b| b == 0);
    match digits.next() {
        None => 0,
        Some(&first) => {
            let rest = digits.count() as u64;
            rest * 8 + u64::from(8 - first.leading_zeros())
        }
    }
}

/// "name (dotted)" from x509-parser's OID registry, or the dotted OID alone.
pub(super) fn oid_name(oid: &Oid<'_>) -> String {
    let Some(dotted) = dotted_oid(oid) else {
        return "(malformed OID)".to_owned();
    };
    match oid2sn(oid, oid_registry()) {
        Ok(name) => format!("{name} ({dotted})"),
        Err(_) => dotted,
    }
}

pub(super) fn extension_name(oid: &Oid<'_>) -> String {
    match dotted_oid(oid).unwrap_or_default().as_str() {
        "2.5.29.17" => "subjectAltName".to_owned(),
        "2.5.29.19" => "basicConstraints".to_owned(),
        "2.5.29.15" => "keyUsage".to_owned(),
        "2.5.29.37" => "extKeyUsage".to_owned(),
        "2.5.29.14" => "subjectKeyIdentifier".to_owned(),
        _ => oid_name(oid),
    }
}

pub(super) fn attribute_name(oid: &Oid<'_>) -> String {
    match dotted_oid(oid).unwrap_or_default().as_str() {
        OID_EXTENSION_REQUEST => "extensionRequest".to_owned(),
        OID_CHALLENGE_PASSWORD => "challengePassword".to_owned(),
        _ => oid_name(oid),
    }
}
