//! Certs-only CMS SignedData (RFC 5652 section 5, RFC 7030 section 4.1.3): the body of the
//! `cacerts` and enrollment answers.
//!
//! ```text
//! ContentInfo ::= SEQUENCE { contentType id-signedData, content [0] EXPLICIT SignedData }
//! SignedData ::= SEQUENCE {
//!   version INTEGER (1), digestAlgorithms SET {} , encapContentInfo SEQUENCE { id-data },
//!   certificates [0] IMPLICIT SET OF Certificate, signerInfos SET {} }
//! ```
//!
//! The certificate set keeps the order it is given in, on encoding and on decoding. DER would
//! sort a SET OF, but IoT Edge's EST client takes the first certificate as the issued leaf, and
//! `openssl crl2pkcs7` does not sort either; so the set is an order-preserving newtype rather
//! than der's `SetOfVec` (crate notes).

use der::asn1::{AnyRef, ObjectIdentifier};
use der::{
    Decode, DecodeValue, Encode, EncodeValue, FixedTag, Header, Length, Reader, Sequence, Tag,
    Writer,
};

use super::ProtocolError;

/// id-signedData (RFC 5652 section 5.1).
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
/// id-data (RFC 5652 section 4).
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");

/// Nesting limit of the BER normaliser. A certificate nests about ten levels deep and the
/// PKCS#7 wrapping adds five, so this is generous while bounding the recursion.
const MAX_BER_DEPTH: usize = 48;

/// Encodes certificates (each one certificate's complete DER) as a certs-only SignedData,
/// keeping their order: put the issued certificate first.
///
/// Each input must be one whole DER SEQUENCE; otherwise, or if the message would exceed der's
/// 256 MiB length limit, the error says which input is at fault (a bug on our side, not the
/// client's).
pub fn encode_certs_only(certs: &[&[u8]]) -> Result<Vec<u8>, ProtocolError> {
    for (i, cert) in certs.iter().enumerate() {
        check_certificate(cert).map_err(|why| malformed(format!("certificate {i}: {why}")))?;
    }
    let signed_data = SignedData {
        version: 1,
        digest_algorithms: RawSet::EMPTY,
        encap_content_info: EncapContentInfo {
            e_content_type: ID_DATA,
            e_content: None,
        },
        certificates: Some(CertSet(certs.to_vec())),
        crls: None,
        signer_infos: RawSet::EMPTY,
    };
    let cannot = |e: der::Error| malformed(format!("cannot encode: {e}"));
    // Encoded first, so that ContentInfo stays one non-generic type for both directions.
    let signed_data = signed_data.to_der().map_err(cannot)?;
    let content_info = ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: AnyRef::try_from(signed_data.as_slice()).map_err(cannot)?,
    };
    content_info.to_der().map_err(cannot)
}

/// Decodes a certs-only SignedData (e.g. an upstream CA's answer) into its certificates' DER,
/// in encoded order.
///
/// Tolerant where senders differ: SignedData versions 1 to 4, any digestAlgorithms, CRLs,
/// signerInfos and encapsulated content (all ignored), no certificates at all (an empty list).
/// Strict where it matters: the outer type must be id-signedData, nothing may follow the
/// message, and every certificate must be a well-formed DER SEQUENCE (other CMS certificate
/// choices such as attribute certificates are refused rather than skipped, so the first
/// certificate stays the first). BER with indefinite lengths, as OpenSSL-based CAs may send,
/// is normalised to DER when plain DER decoding fails.
pub fn decode_certs_only(input: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    if input.is_empty() {
        return Err(malformed("the message is empty".to_owned()));
    }
    match decode_der(input) {
        Ok(certs) => Ok(certs),
        Err(der_err) => match ber_to_der(input) {
            // Only a different encoding can decode differently; otherwise the DER error is the
            // more precise one.
            Ok(normalised) if normalised != input => decode_der(&normalised),
            _ => Err(der_err),
        },
    }
}

fn decode_der(input: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let content_info = ContentInfo::from_der(input)
        .map_err(|e| malformed(format!("not a CMS ContentInfo: {e}")))?;
    if content_info.content_type != ID_SIGNED_DATA {
        return Err(malformed(format!(
            "content type {} is not id-signedData",
            content_info.content_type
        )));
    }
    let signed_data: SignedData<'_> = content_info
        .content
        .decode_as()
        .map_err(|e| malformed(format!("not a SignedData: {e}")))?;
    if !(1..=4).contains(&signed_data.version) {
        return Err(malformed(format!(
            "unsupported SignedData version {}",
            signed_data.version
        )));
    }
    let certs = signed_data
        .certificates
        .map(|set| set.0)
        .unwrap_or_default();
    certs
        .into_iter()
        .enumerate()
        .map(|(i, cert)| {
            check_certificate(cert)
                .map(|()| cert.to_vec())
                .map_err(|why| malformed(format!("certificate {i}: {why}")))
        })
        .collect()
}

fn malformed(message: String) -> ProtocolError {
    ProtocolError::MalformedPkcs7(message)
}

/// A certificate must be one DER SEQUENCE whose nested TLVs are all well-formed DER (definite,
/// minimal lengths); its contents are the caller's to parse.
fn check_certificate(cert: &[u8]) -> Result<(), String> {
    if cert.first() != Some(&0x30) {
        return Err(
            "not a SEQUENCE (attribute and other certificate types are not supported)".into(),
        );
    }
    match ber_to_der(cert) {
        Ok(der) if der == cert => Ok(()),
        Ok(_) => Err("not DER encoded".into()),
        Err(why) => Err(why),
    }
}

// --- ASN.1 types -------------------------------------------------------------------------------

#[derive(Sequence)]
struct ContentInfo<'a> {
    content_type: ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT")]
    content: AnyRef<'a>,
}

#[derive(Sequence)]
struct SignedData<'a> {
    version: u8,
    digest_algorithms: RawSet<'a>,
    encap_content_info: EncapContentInfo<'a>,
    #[asn1(context_specific = "0", tag_mode = "IMPLICIT", optional = "true")]
    certificates: Option<CertSet<'a>>,
    #[asn1(context_specific = "1", tag_mode = "IMPLICIT", optional = "true")]
    crls: Option<RawSet<'a>>,
    signer_infos: RawSet<'a>,
}

#[derive(Sequence)]
struct EncapContentInfo<'a> {
    e_content_type: ObjectIdentifier,
    #[asn1(context_specific = "0", tag_mode = "EXPLICIT", optional = "true")]
    e_content: Option<AnyRef<'a>>,
}

/// A SET whose contents we neither build nor inspect (digestAlgorithms, crls, signerInfos).
struct RawSet<'a>(&'a [u8]);

impl RawSet<'_> {
    const EMPTY: RawSet<'static> = RawSet(&[]);
}

impl FixedTag for RawSet<'_> {
    const TAG: Tag = Tag::Set;
}

impl<'a> DecodeValue<'a> for RawSet<'a> {
    fn decode_value<R: Reader<'a>>(reader: &mut R, header: Header) -> der::Result<Self> {
        reader.read_slice(header.length).map(RawSet)
    }
}

impl EncodeValue for RawSet<'_> {
    fn value_len(&self) -> der::Result<Length> {
        Length::try_from(self.0.len())
    }

    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        writer.write(self.0)
    }
}

/// `SET OF Certificate` as a sequence of already-encoded TLVs, in the order given or read
/// (deliberately not sorted; see the module documentation).
struct CertSet<'a>(Vec<&'a [u8]>);

impl FixedTag for CertSet<'_> {
    const TAG: Tag = Tag::Set;
}

impl<'a> DecodeValue<'a> for CertSet<'a> {
    fn decode_value<R: Reader<'a>>(reader: &mut R, header: Header) -> der::Result<Self> {
        reader.read_nested(header.length, |reader| {
            let mut certs = Vec::new();
            while !reader.is_finished() {
                certs.push(reader.tlv_bytes()?);
            }
            Ok(CertSet(certs))
        })
    }
}

impl EncodeValue for CertSet<'_> {
    fn value_len(&self) -> der::Result<Length> {
        self.0.iter().try_fold(Length::ZERO, |len, cert| {
            len + Length::try_from(cert.len())?
        })
    }

    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        self.0.iter().try_for_each(|cert| writer.write(cert))
    }
}

// --- BER to DER --------------------------------------------------------------------------------

/// Re-encodes one BER TLV (and nothing after it) as DER at the TLV level: indefinite lengths of
/// constructed values become definite, long-form lengths become minimal, and constructed OCTET
/// STRINGs (streamed content) become primitive. Primitive contents are copied unchanged; other
/// BER-only forms (other constructed strings, non-minimal booleans) are left as they are and then
/// fail DER decoding. Applied to DER, it returns the input unchanged.
fn ber_to_der(input: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(input.len());
    let rest = normalise_tlv(input, &mut out, 0)?;
    if !rest.is_empty() {
        return Err(format!("{} bytes of trailing data", rest.len()));
    }
    Ok(out)
}

/// Appends the DER form of the TLV at the start of `input` to `out`; returns what follows it.
fn normalise_tlv<'a>(input: &'a [u8], out: &mut Vec<u8>, depth: usize) -> Result<&'a [u8], String> {
    if depth > MAX_BER_DEPTH {
        return Err("nested too deeply".into());
    }
    let truncated = || "truncated".to_owned();
    let (&first, _) = input.split_first().ok_or_else(truncated)?;
    let constructed = first & 0x20 != 0;
    // Identifier octets: one, or (high tag number form) continued while bit 8 is set.
    let mut tag_len = 1;
    if first & 0x1f == 0x1f {
        loop {
            let &b = input.get(tag_len).ok_or_else(truncated)?;
            tag_len += 1;
            if b & 0x80 == 0 {
                break;
            }
            if tag_len > 5 {
                return Err("tag number too large".into());
            }
        }
    }
    let (tag, rest) = input.split_at_checked(tag_len).ok_or_else(truncated)?;
    let (&len_octet, mut rest) = rest.split_first().ok_or_else(truncated)?;

    let mut content = Vec::new();
    match len_octet {
        0x80 => {
            if !constructed {
                return Err("indefinite length on a primitive value".into());
            }
            loop {
                if let Some(after_eoc) = rest.strip_prefix(&[0u8, 0u8][..]) {
                    rest = after_eoc;
                    break;
                }
                if rest.is_empty() {
                    return Err("indefinite length without end-of-contents".into());
                }
                rest = normalise_tlv(rest, &mut content, depth + 1)?;
            }
        }
        0..=0x7f | 0x81..=0x84 => {
            let len = if len_octet < 0x80 {
                usize::from(len_octet)
            } else {
                let (octets, after) = rest
                    .split_at_checked(usize::from(len_octet & 0x7f))
                    .ok_or_else(truncated)?;
                rest = after;
                octets
                    .iter()
                    .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
            };
            let (value, after) = rest
                .split_at_checked(len)
                .ok_or_else(|| format!("length {len} exceeds the remaining data"))?;
            rest = after;
            if constructed {
                let mut inner = value;
                while !inner.is_empty() {
                    inner = normalise_tlv(inner, &mut content, depth + 1)?;
                }
            } else {
                out.extend_from_slice(tag);
                push_der_length(out, value.len());
                out.extend_from_slice(value);
                return Ok(rest);
            }
        }
        _ => return Err("unsupported length encoding".into()),
    }
    if first == 0x24 {
        // A constructed OCTET STRING (streamed eContent) becomes one primitive OCTET STRING;
        // its segments were already flattened by the recursion above.
        let value = concat_octet_strings(&content)?;
        out.push(0x04);
        push_der_length(out, value.len());
        out.extend_from_slice(&value);
        return Ok(rest);
    }
    out.extend_from_slice(tag);
    push_der_length(out, content.len());
    out.extend_from_slice(&content);
    Ok(rest)
}

/// The contents of a sequence of DER primitive OCTET STRINGs, concatenated.
fn concat_octet_strings(mut der: &[u8]) -> Result<Vec<u8>, String> {
    let mut value = Vec::with_capacity(der.len());
    while !der.is_empty() {
        let (segment, rest) = split_octet_string(der)
            .ok_or("a constructed OCTET STRING holds something else than OCTET STRINGs")?;
        value.extend_from_slice(segment);
        der = rest;
    }
    Ok(value)
}

/// Splits a DER primitive OCTET STRING off the front of `der`: (its contents, what follows).
fn split_octet_string(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&len_octet, rest) = rest.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (len, rest) = match len_octet {
        0..=0x7f => (usize::from(len_octet), rest),
        0x81..=0x84 => {
            let (octets, rest) = rest.split_at_checked(usize::from(len_octet & 0x7f))?;
            let len = octets
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest)
        }
        _ => return None,
    };
    rest.split_at_checked(len)
}

/// Minimal DER length octets.
fn push_der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    let significant = bytes.get(skip..).unwrap_or_default();
    out.push(0x80 | significant.len() as u8);
    out.extend_from_slice(significant);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use std::process::Command;

    /// [leaf, intermediate, root], DER, chained.
    fn chain() -> Vec<Vec<u8>> {
        chain_and_leaf_key().0
    }

    /// The chain and the leaf's private key (PKCS#8 PEM).
    fn chain_and_leaf_key() -> (Vec<Vec<u8>>, String) {
        let root_key = KeyPair::generate().expect("key");
        let mut root_params = CertificateParams::new(Vec::new()).expect("params");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ZZZ root");
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, &root_key);

        let int_key = KeyPair::generate().expect("key");
        let mut int_params = CertificateParams::new(Vec::new()).expect("params");
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "MMM intermediate");
        let int = int_params
            .signed_by(&int_key, &root_issuer)
            .expect("intermediate");
        let int_issuer = Issuer::new(int_params, &int_key);

        let leaf_key = KeyPair::generate().expect("key");
        let mut leaf_params = CertificateParams::new(vec!["device-01".to_owned()]).expect("params");
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "AAA leaf");
        let leaf = leaf_params.signed_by(&leaf_key, &int_issuer).expect("leaf");
        (
            vec![leaf.der().to_vec(), int.der().to_vec(), root.der().to_vec()],
            leaf_key.serialize_pem(),
        )
    }

    fn refs(certs: &[Vec<u8>]) -> Vec<&[u8]> {
        certs.iter().map(Vec::as_slice).collect()
    }

    fn encode(certs: &[Vec<u8>]) -> Vec<u8> {
        encode_certs_only(&refs(certs)).expect("encode")
    }

    fn pem(der: &[u8], label: &str) -> String {
        format!(
            "-----BEGIN {label}-----\n{}-----END {label}-----\n",
            super::super::body::encode_base64_lines(der)
        )
    }

    fn openssl_available() -> bool {
        let ok = Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            // A missing openssl fails the cross-check: a green run means it ran. The explicit
            // opt-out is the integration tests' (tests/common/mod.rs).
            assert!(
                std::env::var("EDGE_EST_SKIP_MISSING_TOOLS").is_ok_and(|v| v == "1"),
                "openssl is not installed (apt-get install openssl); set \
                 EDGE_EST_SKIP_MISSING_TOOLS=1 to skip the OpenSSL cross-checks"
            );
            eprintln!("SKIPPED (EDGE_EST_SKIP_MISSING_TOOLS=1): the OpenSSL cross-check");
        }
        ok
    }

    #[test]
    fn round_trip_preserves_order() {
        let certs = chain();
        let der = encode(&certs);
        assert_eq!(decode_certs_only(&der), Ok(certs.clone()));

        // A sorted SET OF would have reordered at least one of these orders.
        let mut sorted = certs.clone();
        sorted.sort();
        let reversed: Vec<Vec<u8>> = certs.iter().rev().cloned().collect();
        for order in [certs.clone(), reversed, sorted] {
            assert_eq!(decode_certs_only(&encode(&order)), Ok(order));
        }
        // The issued leaf is the first certificate inside the encoding.
        let leaf_at = der.windows(certs[0].len()).position(|w| w == certs[0]);
        let root_at = der.windows(certs[2].len()).position(|w| w == certs[2]);
        assert!(leaf_at < root_at);
    }

    #[test]
    fn exact_structure() {
        let der = encode(&[]);
        // ContentInfo { id-signedData, [0] { SignedData { 1, {}, { id-data }, [0] {}, {} } } }
        let expected: &[u8] = &[
            0x30, 0x25, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02, 0xa0,
            0x18, 0x30, 0x16, 0x02, 0x01, 0x01, 0x31, 0x00, 0x30, 0x0b, 0x06, 0x09, 0x2a, 0x86,
            0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01, 0xa0, 0x00, 0x31, 0x00,
        ];
        assert_eq!(der, expected);
        assert_eq!(decode_certs_only(&der), Ok(Vec::new()));
    }

    #[test]
    fn same_bytes_as_openssl_crl2pkcs7() {
        if !openssl_available() {
            return;
        }
        let certs = chain();
        let dir = tempfile::tempdir().expect("tempdir");
        let chain_pem: String = certs.iter().map(|c| pem(c, "CERTIFICATE")).collect();
        let chain_path = dir.path().join("chain.pem");
        std::fs::write(&chain_path, chain_pem).expect("write");
        let out = Command::new("openssl")
            .args(["crl2pkcs7", "-nocrl", "-outform", "DER", "-certfile"])
            .arg(&chain_path)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(encode(&certs), out.stdout);
        assert_eq!(decode_certs_only(&out.stdout), Ok(certs));
    }

    #[test]
    fn openssl_reads_ours_in_our_order() {
        if !openssl_available() {
            return;
        }
        let certs = chain();
        let dir = tempfile::tempdir().expect("tempdir");
        let p7_path = dir.path().join("ours.p7b");
        std::fs::write(&p7_path, encode(&certs)).expect("write");
        let out = Command::new("openssl")
            .args(["pkcs7", "-inform", "DER", "-print_certs", "-in"])
            .arg(&p7_path)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let subjects: Vec<&str> = text.lines().filter(|l| l.starts_with("subject=")).collect();
        assert_eq!(subjects.len(), 3, "{text}");
        assert!(subjects[0].contains("AAA leaf"), "{text}");
        assert!(subjects[1].contains("MMM intermediate"), "{text}");
        assert!(subjects[2].contains("ZZZ root"), "{text}");
        // The printed PEM blocks are our certificates, in our order.
        let blocks: Vec<Vec<u8>> = text
            .split("-----BEGIN CERTIFICATE-----")
            .skip(1)
            .map(|b| {
                super::super::body::decode_base64_body(
                    format!("-----BEGIN CERTIFICATE-----{b}").as_bytes(),
                )
                .expect("pem")
            })
            .collect();
        assert_eq!(blocks, certs);
    }

    #[test]
    fn refuses_bad_inputs_to_encode() {
        let certs = chain();
        let mut truncated = certs[0].clone();
        truncated.pop();
        let pem_text = pem(&certs[0], "CERTIFICATE").into_bytes();
        for bad in [
            &[][..],
            &[0x02, 0x01, 0x00],
            &truncated,
            &pem_text,
            &[0x30, 0x80, 0, 0],
        ] {
            assert!(
                matches!(encode_certs_only(&[&certs[1], bad]), Err(ProtocolError::MalformedPkcs7(m)) if m.starts_with("certificate 1")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tolerant_decoding() {
        let certs = chain();
        let cert_set: Vec<u8> = certs.concat();
        let oid_data = [
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01,
        ];
        // version 3, a digest algorithm, eContent present, CRLs, a (fake) signerInfo.
        let mut sd_body = vec![0x02, 0x01, 0x03];
        sd_body.extend([
            0x31, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00,
        ]);
        sd_body.extend([0x30, 0x11]);
        sd_body.extend(oid_data);
        sd_body.extend([0xa0, 0x04, 0x04, 0x02, 0xab, 0xcd]);
        sd_body.push(0xa0);
        push_der_length(&mut sd_body, cert_set.len());
        sd_body.extend(&cert_set);
        sd_body.extend([0xa1, 0x02, 0x30, 0x00]);
        sd_body.extend([0x31, 0x02, 0x30, 0x00]);
        let msg = wrap_signed_data(&sd_body);
        assert_eq!(decode_certs_only(&msg), Ok(certs.clone()));

        // No certificates at all.
        let mut sd_body = vec![0x02, 0x01, 0x01, 0x31, 0x00, 0x30, 0x0b];
        sd_body.extend(oid_data);
        sd_body.extend([0x31, 0x00]);
        assert_eq!(
            decode_certs_only(&wrap_signed_data(&sd_body)),
            Ok(Vec::new())
        );
    }

    fn wrap_signed_data(sd_body: &[u8]) -> Vec<u8> {
        let mut sd = vec![0x30];
        push_der_length(&mut sd, sd_body.len());
        sd.extend(sd_body);
        let mut explicit = vec![0xa0];
        push_der_length(&mut explicit, sd.len());
        explicit.extend(sd);
        let mut ci_body = vec![
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02,
        ];
        ci_body.extend(explicit);
        let mut ci = vec![0x30];
        push_der_length(&mut ci, ci_body.len());
        ci.extend(ci_body);
        ci
    }

    #[test]
    fn strict_where_it_matters() {
        let certs = chain();
        let good = encode(&certs);

        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_certs_only(&trailing).is_err());

        // id-data instead of id-signedData
        let mut wrong_type = good.clone();
        let at = good
            .windows(3)
            .position(|w| w == [0x01, 0x07, 0x02])
            .expect("oid");
        wrong_type[at + 2] = 0x01;
        assert!(matches!(
            decode_certs_only(&wrong_type),
            Err(ProtocolError::MalformedPkcs7(m)) if m.contains("not id-signedData")
        ));

        // version 5
        let mut v5 = good.clone();
        let at = good
            .windows(3)
            .position(|w| w == [0x02, 0x01, 0x01])
            .expect("version");
        v5[at + 2] = 5;
        assert!(matches!(
            decode_certs_only(&v5),
            Err(ProtocolError::MalformedPkcs7(m)) if m.contains("version 5")
        ));

        // An attribute certificate choice ([1]) instead of a Certificate.
        let mut sd_body = vec![0x02, 0x01, 0x01, 0x31, 0x00, 0x30, 0x0b];
        sd_body.extend([
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01,
        ]);
        sd_body.extend([0xa0, 0x04, 0xa1, 0x02, 0x05, 0x00]);
        sd_body.extend([0x31, 0x00]);
        assert!(matches!(
            decode_certs_only(&wrap_signed_data(&sd_body)),
            Err(ProtocolError::MalformedPkcs7(m)) if m.contains("certificate 0")
        ));
    }

    #[test]
    fn garbage_gives_errors_not_panics() {
        let good = encode(&chain());
        for len in 0..good.len() {
            assert!(decode_certs_only(&good[..len]).is_err(), "prefix {len}");
        }
        // Flip every byte in turn: must never panic (the result may still decode if the flip
        // lands inside a certificate's contents).
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            let _ = decode_certs_only(&bad);
        }
        let huge_lengths: [&[u8]; 6] = [
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff, 0x06],
            &[0x30, 0x88, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x80],
            &[0x30, 0x80, 0x30, 0x80, 0x00],
            &[0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00],
            &[0xff],
        ];
        for bad in huge_lengths {
            assert!(decode_certs_only(bad).is_err(), "{bad:?}");
        }
        assert!(decode_certs_only(b"MIIB").is_err());
        assert!(decode_certs_only(&[]).is_err());
        // Deep indefinite nesting is bounded.
        let mut deep = [0x30, 0x80].repeat(100_000);
        deep.extend([0u8, 0].repeat(100_000));
        assert!(decode_certs_only(&deep).is_err());
        let mut deep_definite = Vec::new();
        for _ in 0..1000 {
            let mut outer = vec![0x30];
            push_der_length(&mut outer, deep_definite.len());
            outer.extend(deep_definite);
            deep_definite = outer;
        }
        assert!(decode_certs_only(&deep_definite).is_err());
    }

    #[test]
    fn ber_indefinite_lengths_are_normalised() {
        let certs = chain();
        let der = encode(&certs);
        let ber = to_indefinite(&der);
        assert_ne!(ber, der);
        assert_eq!(ber_to_der(&ber), Ok(der.clone()));
        assert_eq!(decode_certs_only(&ber), Ok(certs.clone()));

        // Non-minimal long-form lengths.
        let mut long_form = vec![0x30, 0x84];
        long_form.extend(((der.len() - 4) as u32).to_be_bytes());
        long_form.extend(&der[4..]);
        assert_eq!(decode_certs_only(&long_form), Ok(certs));

        // What OpenSSL itself makes of BER input: the same certificates.
        assert_eq!(ber_to_der(&der), Ok(der.clone()));
        assert!(ber_to_der(&[0x04, 0x80, 0x00, 0x00]).is_err());
        // Constructed OCTET STRINGs, nested, with both length forms.
        let segmented = [
            0x24, 0x80, 0x04, 0x01, 0xaa, 0x24, 0x80, 0x04, 0x01, 0xbb, 0x00, 0x00, 0x24, 0x03,
            0x04, 0x01, 0xcc, 0x00, 0x00,
        ];
        assert_eq!(
            ber_to_der(&segmented),
            Ok(vec![0x04, 0x03, 0xaa, 0xbb, 0xcc])
        );
        assert_eq!(ber_to_der(&[0x24, 0x80, 0x00, 0x00]), Ok(vec![0x04, 0x00]));
        assert!(ber_to_der(&[0x24, 0x80, 0x02, 0x01, 0x01, 0x00, 0x00]).is_err());
        assert!(ber_to_der(&[0x30, 0x80, 0x02, 0x01, 0x01]).is_err());
        assert!(ber_to_der(&[0x30, 0x00, 0x00]).is_err());
    }

    #[test]
    fn reads_openssl_streamed_ber() {
        if !openssl_available() {
            return;
        }
        let (certs, leaf_key) = chain_and_leaf_key();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name);
        std::fs::write(path("leaf.pem"), pem(&certs[0], "CERTIFICATE")).expect("write");
        std::fs::write(path("key.pem"), leaf_key).expect("write");
        let rest: String = certs[1..].iter().map(|c| pem(c, "CERTIFICATE")).collect();
        std::fs::write(path("rest.pem"), rest).expect("write");
        std::fs::write(path("data.txt"), "hello").expect("write");
        for detach in ["-nodetach", "-binary"] {
            let out = Command::new("openssl")
                .args(["cms", "-sign", "-stream", "-outform", "DER", detach, "-in"])
                .arg(path("data.txt"))
                .arg("-signer")
                .arg(path("leaf.pem"))
                .arg("-inkey")
                .arg(path("key.pem"))
                .arg("-certfile")
                .arg(path("rest.pem"))
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let ber = out.stdout;
            assert_eq!(
                ber.get(..2),
                Some(&[0x30, 0x80][..]),
                "OpenSSL streamed BER"
            );
            let got = decode_certs_only(&ber).expect("decode BER");
            let mut sorted_got = got.clone();
            sorted_got.sort();
            let mut sorted_certs = certs.clone();
            sorted_certs.sort();
            assert_eq!(sorted_got, sorted_certs);
            // The signer comes first in OpenSSL's encoding, and we keep that order.
            assert_eq!(got.first(), certs.first());
        }
    }

    /// Re-encodes the outer PKCS#7 layers (not the certificates) with indefinite lengths, the
    /// way OpenSSL's streaming BER output does.
    fn to_indefinite(der: &[u8]) -> Vec<u8> {
        let ci = AnyRef::try_from(der).expect("ci");
        let mut out = vec![0x30, 0x80];
        let mut r = der::SliceReader::new(ci.value()).expect("reader");
        let oid = r.tlv_bytes().expect("oid");
        out.extend(oid);
        let explicit = AnyRef::try_from(r.tlv_bytes().expect("explicit")).expect("any");
        out.extend([0xa0, 0x80, 0x30, 0x80]);
        let sd = AnyRef::try_from(explicit.value()).expect("sd");
        let mut r = der::SliceReader::new(sd.value()).expect("reader");
        while !r.is_finished() {
            let tlv = r.tlv_bytes().expect("tlv");
            if tlv[0] == 0xa0 {
                let set = AnyRef::try_from(tlv).expect("set");
                out.extend([0xa0, 0x80]);
                out.extend(set.value());
                out.extend([0, 0]);
            } else {
                out.extend(tlv);
            }
        }
        out.extend([0, 0, 0, 0, 0, 0]);
        out
    }
}
