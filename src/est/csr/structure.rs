//! The DER structure of a CSR beyond what x509-parser checks, and readable explanations of
//! what it refused.

use super::*;

/// Checks the tags x509-parser lets through outside the signed part: the outer SEQUENCE, the
/// signature AlgorithmIdentifier and its OID, and the signature BIT STRING must carry their
/// universal tags, so that one CSR has one accepted encoding.
pub(super) fn check_envelope(csr: &[u8]) -> Result<(), String> {
    let bad = || "its outer structure is not DER of a CertificationRequest".to_owned();
    let universal = |any: &Any<'_>, tag: Tag| any.class() == Class::Universal && any.tag() == tag;
    let (_, outer) = Any::from_der(csr).map_err(|_| bad())?;
    let (rest, info) = Any::from_der(outer.data).map_err(|_| bad())?;
    let (rest, algorithm) = Any::from_der(rest).map_err(|_| bad())?;
    let (rest, signature) = Any::from_der(rest).map_err(|_| bad())?;
    let (_, algorithm_oid) = Any::from_der(algorithm.data).map_err(|_| bad())?;
    let sound = universal(&outer, Tag::Sequence)
        && universal(&info, Tag::Sequence)
        && universal(&algorithm, Tag::Sequence)
        && universal(&algorithm_oid, Tag::Oid)
        && universal(&signature, Tag::BitString)
        && rest.is_empty();
    if sound {
        Ok(())
    } else {
        Err(bad())
    }
}

/// One strict pass over the signed CertificationRequestInfo (RFC 2986, with RFC 5280's
/// Extensions): DER throughout, and every element the grammar fixes carries its own tag. Above
/// all, every OBJECT IDENTIFIER position must carry tag 0x06 (subject attribute types, the
/// public key algorithm, attribute types, requested extension OIDs, extKeyUsage purposes, and
/// the otherName types and directoryName attribute types of a requested subjectAltName), since
/// x509-parser would read an INTEGER holding OID bytes as that OID. The grammar fixes the depth,
/// so there is no recursion; values of type ANY are only delimited.
pub(super) fn check_request_info(info: &[u8]) -> Result<(), String> {
    let top = elements(info)?;
    let [info] = top.as_slice() else {
        return Err("its certificationRequestInfo is not a single element".to_owned());
    };
    let fields = elements(expect_tag(info, TAG_SEQUENCE, || {
        "its certificationRequestInfo".to_owned()
    })?)?;
    let [version, subject, spki, attributes] = fields.as_slice() else {
        return Err(format!(
            "its certificationRequestInfo has {} fields instead of 4",
            fields.len()
        ));
    };
    expect_tag(version, TAG_INTEGER, || "its version".to_owned())?;
    check_name(subject, "subject")?;

    let spki = elements(expect_tag(spki, TAG_SEQUENCE, || {
        "its subjectPublicKeyInfo".to_owned()
    })?)?;
    let [algorithm, key] = spki.as_slice() else {
        return Err("its subjectPublicKeyInfo is not exactly an algorithm and a key".to_owned());
    };
    let algorithm = elements(expect_tag(algorithm, TAG_SEQUENCE, || {
        "its public key AlgorithmIdentifier".to_owned()
    })?)?;
    let ([oid] | [oid, _]) = algorithm.as_slice() else {
        return Err("its public key AlgorithmIdentifier is not an OID and parameters".to_owned());
    };
    expect_tag(oid, TAG_OID, || "its public key algorithm".to_owned())?;
    expect_tag(key, TAG_BIT_STRING, || "its public key".to_owned())?;

    let attributes = elements(expect_tag(attributes, TAG_CONTEXT_0, || {
        "its attributes field".to_owned()
    })?)?;
    for (n, attribute) in (1..).zip(&attributes) {
        let fields = elements(expect_tag(attribute, TAG_SEQUENCE, || {
            format!("its attribute #{n}")
        })?)?;
        let [attr_type, values] = fields.as_slice() else {
            return Err(format!(
                "its attribute #{n} is not exactly a type and a set of values"
            ));
        };
        let oid = expect_tag(attr_type, TAG_OID, || {
            format!("the type of its attribute #{n}")
        })?;
        let values = elements(expect_tag(values, TAG_SET, || {
            format!("the values of its attribute #{n}")
        })?)?;
        if oid == OID_BYTES_EXTENSION_REQUEST {
            for value in &values {
                check_extension_request(value)?;
            }
        }
    }
    Ok(())
}

/// The DER elements of `der`, for [`check_request_info`].
pub(super) fn elements(der: &[u8]) -> Result<Vec<Tlv<'_>>, String> {
    der_elements(der).map_err(|why| format!("its certificationRequestInfo is not DER ({why})"))
}

/// Extensions ::= SEQUENCE OF SEQUENCE { extnID OID, critical BOOLEAN DEFAULT FALSE,
/// extnValue OCTET STRING }, looking into extKeyUsage and subjectAltName values.
pub(super) fn check_extension_request(value: &Tlv<'_>) -> Result<(), String> {
    let extensions = elements(expect_tag(value, TAG_SEQUENCE, || {
        "its extensionRequest value".to_owned()
    })?)?;
    for (n, extension) in (1..).zip(&extensions) {
        let what = || format!("requested extension #{n}");
        let fields = elements(expect_tag(extension, TAG_SEQUENCE, what)?)?;
        let (extn_id, extn_value) = match fields.as_slice() {
            [extn_id, extn_value] => (extn_id, extn_value),
            [extn_id, critical, extn_value] => {
                expect_tag(critical, TAG_BOOLEAN, || {
                    format!("the critical flag of requested extension #{n}")
                })?;
                (extn_id, extn_value)
            }
            _ => return Err(format!("requested extension #{n} is not an Extension")),
        };
        let oid = expect_tag(extn_id, TAG_OID, || {
            format!("the extnID of requested extension #{n}")
        })?;
        let extn_value = expect_tag(extn_value, TAG_OCTET_STRING, || {
            format!("the extnValue of requested extension #{n}")
        })?;
        if oid == OID_BYTES_EXT_KEY_USAGE {
            for (i, purpose) in (1..).zip(&single_sequence(extn_value, "extKeyUsage")?) {
                expect_tag(purpose, TAG_OID, || {
                    format!("purpose #{i} of the requested extKeyUsage")
                })?;
            }
        } else if oid == OID_BYTES_SUBJECT_ALT_NAME {
            for (i, name) in (1..).zip(&single_sequence(extn_value, "subjectAltName")?) {
                check_general_name(name, i)?;
            }
        }
    }
    Ok(())
}

/// The elements of the one SEQUENCE an extension value holds.
pub(super) fn single_sequence<'a>(
    extn_value: &'a [u8],
    name: &str,
) -> Result<Vec<Tlv<'a>>, String> {
    match elements(extn_value)?.as_slice() {
        [sequence] => elements(expect_tag(sequence, TAG_SEQUENCE, || {
            format!("the requested {name}")
        })?),
        _ => Err(format!("the requested {name} is not a single SEQUENCE")),
    }
}

/// The OID positions of a GeneralName: otherName's type-id, directoryName's attribute types.
pub(super) fn check_general_name(name: &Tlv<'_>, n: usize) -> Result<(), String> {
    match name.tag {
        TAG_CONTEXT_0 => match elements(name.contents)?.as_slice() {
            [type_id, value] if value.tag == TAG_CONTEXT_0 => expect_tag(type_id, TAG_OID, || {
                format!("the type-id of subjectAltName #{n} (otherName)")
            })
            .map(|_| ()),
            _ => Err(format!(
                "subjectAltName #{n} is not an otherName (a type-id and a [0] value)"
            )),
        },
        TAG_CONTEXT_4 => match elements(name.contents)?.as_slice() {
            [dir_name] => check_name(dir_name, &format!("directoryName in subjectAltName #{n}")),
            _ => Err(format!("subjectAltName #{n} is not a single directoryName")),
        },
        _ => Ok(()),
    }
}

/// One attribute of the certificationRequestInfo, read structurally.
pub(super) struct RawAttribute<'a> {
    pub(super) oid: Oid<'a>,
    pub(super) values: Vec<Any<'a>>,
}

/// Reads the attributes of a CSR with a plain DER walk. x509-parser reports any problem in
/// them as a bare "invalid attributes" and keeps only the first value of each; this walk
/// finds out which attribute is at fault and how many values each has.
pub(super) fn raw_attributes(csr: &[u8]) -> Result<Vec<RawAttribute<'_>>, String> {
    let structure = || "its structure is not a PKCS#10 CertificationRequest".to_owned();
    let (_, outer) = Any::from_der(csr).map_err(|_| structure())?;
    let (_, info) = Any::from_der(outer.data).map_err(|_| structure())?;
    let mut fields = info.data;
    // version, subject and subjectPKInfo come before the [0] attributes.
    for _ in 0..3 {
        let (rest, _) = Any::from_der(fields).map_err(|_| structure())?;
        fields = rest;
    }
    let (_, attributes) = Any::from_der(fields)
        .map_err(|_| "its attributes field is missing or malformed".to_owned())?;
    if attributes.class() != Class::ContextSpecific || attributes.tag() != Tag(0) {
        return Err("its attributes field is missing or malformed".to_owned());
    }
    let mut out = Vec::new();
    let mut rest = attributes.data;
    while !rest.is_empty() {
        let bad = || format!("attribute #{} is not an Attribute", out.len() + 1);
        let (next, attribute) = Any::from_der(rest).map_err(|_| bad())?;
        rest = next;
        if attribute.tag() != Tag::Sequence {
            return Err(bad());
        }
        let (after_oid, oid) = oid_from_der(attribute.data).ok_or_else(bad)?;
        let (after_set, set) = Any::from_der(after_oid).map_err(|_| bad())?;
        if set.tag() != Tag::Set || !after_set.is_empty() {
            return Err(bad());
        }
        let mut values = Vec::new();
        let mut in_set = set.data;
        while !in_set.is_empty() {
            let (next, value) = Any::from_der(in_set).map_err(|_| {
                format!(
                    "a value of its {} attribute is malformed",
                    attribute_name(&oid)
                )
            })?;
            values.push(value);
            in_set = next;
        }
        out.push(RawAttribute { oid, values });
    }
    Ok(out)
}

/// Explains a parse failure. x509-parser reports most problems inside the attributes as a bare
/// "invalid attributes" (or a nom error); the DER walk then says which attribute is at fault.
pub(super) fn describe_parse_error(der: &[u8], err: x509_parser::nom::Err<X509Error>) -> String {
    let err = match err {
        x509_parser::nom::Err::Incomplete(_) => return "it is truncated".to_owned(),
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
    };
    let walked = raw_attributes(der);
    if let Some(why) = walked
        .as_ref()
        .ok()
        .and_then(|attributes| attributes.iter().find_map(explain_bad_attribute))
    {
        return why;
    }
    match err {
        X509Error::InvalidAttributes => match walked {
            Err(why) => why,
            Ok(_) => "its attributes are malformed".to_owned(),
        },
        X509Error::InvalidX509Name => "its subject is not a valid Name".to_owned(),
        X509Error::InvalidSPKI => "its subjectPublicKeyInfo is malformed".to_owned(),
        X509Error::InvalidAlgorithmIdentifier => "an AlgorithmIdentifier is malformed".to_owned(),
        X509Error::InvalidVersion => "its version is malformed".to_owned(),
        X509Error::InvalidSignatureValue => "its signature is malformed".to_owned(),
        X509Error::Der(x509_parser::der_parser::error::BerError::Incomplete(_)) => {
            "it is truncated".to_owned()
        }
        X509Error::Der(e) => format!("it is not valid DER ({e})"),
        other => format!("it is not valid ({other})"),
    }
}

/// Why x509-parser would refuse this attribute, for the two attributes it interprets; `None`
/// when the attribute looks sound.
pub(super) fn explain_bad_attribute(attribute: &RawAttribute<'_>) -> Option<String> {
    let value = attribute.values.first();
    match dotted_oid(&attribute.oid).unwrap_or_default().as_str() {
        OID_EXTENSION_REQUEST => {
            let Some(value) = value.filter(|v| v.tag() == Tag::Sequence) else {
                return Some(
                    "its extensionRequest attribute does not hold a SEQUENCE of Extensions"
                        .to_owned(),
                );
            };
            let mut rest = value.data;
            let mut index = 0usize;
            while !rest.is_empty() {
                index += 1;
                match X509Extension::from_der(rest) {
                    Ok((next, _)) => rest = next,
                    Err(_) => {
                        let which = Any::from_der(rest)
                            .ok()
                            .and_then(|(_, seq)| oid_from_der(seq.data))
                            .map(|(_, oid)| extension_name(&oid))
                            .unwrap_or_else(|| format!("#{index}"));
                        return Some(format!(
                            "its extensionRequest attribute is malformed: \
                             extension {which} is not a valid Extension"
                        ));
                    }
                }
            }
            None
        }
        OID_CHALLENGE_PASSWORD => {
            let is_directory_string = value.is_some_and(|v| {
                v.class() == Class::Universal
                    && matches!(
                        v.tag(),
                        Tag::Utf8String
                            | Tag::PrintableString
                            | Tag::TeletexString
                            | Tag::UniversalString
                            | Tag::BmpString
                    )
            });
            (!is_directory_string).then(|| {
                "its challengePassword attribute is not a DirectoryString \
                 (UTF8String, PrintableString, ...)"
                    .to_owned()
            })
        }
        _ => None,
    }
}
