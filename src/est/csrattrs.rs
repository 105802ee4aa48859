//! The `csrattrs` answer (RFC 7030 section 4.5.2):
//!
//! ```text
//! CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID
//! AttrOrOID ::= CHOICE { oid OBJECT IDENTIFIER, attribute Attribute }
//! Attribute ::= SEQUENCE { type OBJECT IDENTIFIER, values SET SIZE (1..MAX) OF ... }
//! ```
//!
//! Attribute values here are OIDs (e.g. the curve of `ecPublicKey`), which covers what the
//! configuration can express.

use std::fmt;

use der::asn1::{ObjectIdentifier, SetOfVec};
use der::{Choice, Encode, Sequence};

/// One item of a `csrattrs` answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CsrAttr {
    /// An OID the CSR should use or contain (a signature algorithm, `challengePassword`, ...).
    Oid(ObjectIdentifier),
    /// An attribute with values, e.g. `ecPublicKey` with the curve `secp384r1`.
    Attribute {
        oid: ObjectIdentifier,
        values: Vec<ObjectIdentifier>,
    },
}

/// Configuration names, matched case-insensitively, and their OIDs.
const NAMES: &[(&str, &str)] = &[
    ("challengePassword", "1.2.840.113549.1.9.7"),
    ("extensionRequest", "1.2.840.113549.1.9.14"),
    ("ecPublicKey", "1.2.840.10045.2.1"),
    ("rsaEncryption", "1.2.840.113549.1.1.1"),
    ("Ed25519", "1.3.101.112"),
    ("ecdsa-with-SHA256", "1.2.840.10045.4.3.2"),
    ("ecdsa-with-SHA384", "1.2.840.10045.4.3.3"),
    ("ecdsa-with-SHA512", "1.2.840.10045.4.3.4"),
    ("sha256WithRSAEncryption", "1.2.840.113549.1.1.11"),
    ("sha384WithRSAEncryption", "1.2.840.113549.1.1.12"),
    ("sha512WithRSAEncryption", "1.2.840.113549.1.1.13"),
    ("secp256r1", "1.2.840.10045.3.1.7"),
    ("prime256v1", "1.2.840.10045.3.1.7"),
    ("secp384r1", "1.3.132.0.34"),
    ("secp521r1", "1.3.132.0.35"),
];

/// Parses a configuration string: a dotted OID (`"1.2.840.113549.1.9.7"`), a known name
/// (`"challengePassword"`, `"ecdsa-with-SHA256"`, ...), or an attribute with one or more
/// comma-separated values (`"ecPublicKey=secp256r1"`, `"1.2.840.10045.2.1=1.3.132.0.34"`).
/// Whitespace around names and separators is ignored.
pub fn parse_csr_attr(s: &str) -> Result<CsrAttr, String> {
    let Some((name, values)) = s.split_once('=') else {
        return parse_oid(s).map(CsrAttr::Oid);
    };
    let oid = parse_oid(name)?;
    let mut parsed: Vec<ObjectIdentifier> = Vec::new();
    for value in values.split(',') {
        let value = parse_oid(value)?;
        if parsed.contains(&value) {
            return Err(format!("duplicate value {value} in \"{}\"", s.trim()));
        }
        parsed.push(value);
    }
    Ok(CsrAttr::Attribute {
        oid,
        values: parsed,
    })
}

fn parse_oid(s: &str) -> Result<ObjectIdentifier, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an OID or a name is missing".to_owned());
    }
    let dotted = NAMES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map_or(s, |&(_, oid)| oid);
    if !dotted.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!(
            "unknown name \"{s}\": use a dotted OID or one of {}",
            NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ));
    }
    oid_from_dotted(dotted).map_err(|why| format!("invalid OID \"{s}\": {why}"))
}

/// Dotted text to an OID, encoded here because const-oid 0.9's own parser mis-encodes arcs such
/// as 128 or 16384 (`1.2.128` becomes `1.2.0`) and overflows (a panic in debug builds) on arcs
/// beyond 32 bits.
fn oid_from_dotted(dotted: &str) -> Result<ObjectIdentifier, String> {
    let arcs = dotted
        .split('.')
        .map(|arc| {
            if arc.is_empty() || !arc.bytes().all(|b| b.is_ascii_digit()) {
                return Err("arcs are decimal numbers separated by single dots".to_owned());
            }
            arc.parse::<u32>()
                .map_err(|_| format!("arc {arc} is too large"))
        })
        .collect::<Result<Vec<u32>, String>>()?;
    let (first, second, rest) = match arcs.as_slice() {
        [first, second, rest @ ..] => (*first, *second, rest),
        _ => return Err("an OID has at least two arcs".to_owned()),
    };
    if first > 2 || second > 39 {
        return Err("the first arc must be 0, 1 or 2 and the second at most 39".to_owned());
    }
    let mut bytes = vec![(first * 40 + second) as u8];
    for &arc in rest {
        // Base 128, most significant group first, bit 8 set on all groups but the last.
        let mut groups = Vec::with_capacity(5);
        let mut n = arc;
        loop {
            groups.push((n & 0x7f) as u8);
            n >>= 7;
            if n == 0 {
                break;
            }
        }
        let last = groups.len() - 1;
        bytes.extend(
            groups
                .iter()
                .rev()
                .enumerate()
                .map(|(i, g)| if i < last { g | 0x80 } else { *g }),
        );
    }
    if bytes.len() < 3 {
        // const-oid cannot represent (or decode) OIDs whose encoding is under three bytes.
        return Err("OIDs this short are not supported".to_owned());
    }
    ObjectIdentifier::from_bytes(&bytes).map_err(|e| e.to_string())
}

impl fmt::Display for CsrAttr {
    /// The configuration form that [`parse_csr_attr`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsrAttr::Oid(oid) => write!(f, "{oid}"),
            CsrAttr::Attribute { oid, values } => {
                write!(f, "{oid}=")?;
                for (i, value) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{value}")?;
                }
                Ok(())
            }
        }
    }
}

/// DER `CsrAttrs` in the given order (the SEQUENCE OF keeps it; each attribute's SET OF values is
/// sorted as DER requires, duplicates dropped). An attribute without values, which RFC 7030
/// forbids and [`parse_csr_attr`] never produces, is sent as its bare OID.
pub fn encode_csrattrs(attrs: &[CsrAttr]) -> Vec<u8> {
    // der fails only on sets with duplicates (removed here) and past its 256 MiB length limit,
    // which a configuration cannot reach; "nothing requested" is the harmless answer then.
    try_encode(attrs).unwrap_or_else(|_| vec![0x30, 0x00])
}

fn try_encode(attrs: &[CsrAttr]) -> der::Result<Vec<u8>> {
    let items = attrs
        .iter()
        .map(|attr| match attr {
            CsrAttr::Oid(oid) => Ok(AttrOrOid::Oid(*oid)),
            CsrAttr::Attribute { oid, values } if values.is_empty() => Ok(AttrOrOid::Oid(*oid)),
            CsrAttr::Attribute { oid, values } => {
                let mut values = values.clone();
                values.sort();
                values.dedup();
                Ok(AttrOrOid::Attribute(Attribute {
                    attr_type: *oid,
                    values: SetOfVec::try_from(values)?,
                }))
            }
        })
        .collect::<der::Result<Vec<_>>>()?;
    items.to_der()
}

#[derive(Choice)]
enum AttrOrOid {
    Oid(ObjectIdentifier),
    Attribute(Attribute),
}

#[derive(Sequence)]
struct Attribute {
    attr_type: ObjectIdentifier,
    values: SetOfVec<ObjectIdentifier>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use der::Decode;
    use std::process::Command;

    fn oid(s: &str) -> ObjectIdentifier {
        ObjectIdentifier::new(s).expect("oid")
    }

    fn parse(s: &str) -> CsrAttr {
        parse_csr_attr(s).expect(s)
    }

    fn decode(der: &[u8]) -> Vec<CsrAttr> {
        Vec::<AttrOrOid>::from_der(der)
            .expect("decode")
            .into_iter()
            .map(|item| match item {
                AttrOrOid::Oid(oid) => CsrAttr::Oid(oid),
                AttrOrOid::Attribute(a) => CsrAttr::Attribute {
                    oid: a.attr_type,
                    values: a.values.into_vec(),
                },
            })
            .collect()
    }

    #[test]
    fn parses_config_strings() {
        assert_eq!(
            parse("1.2.840.113549.1.9.7"),
            CsrAttr::Oid(oid("1.2.840.113549.1.9.7"))
        );
        assert_eq!(parse("challengePassword"), parse("1.2.840.113549.1.9.7"));
        assert_eq!(parse(" ChallengePassword "), parse("1.2.840.113549.1.9.7"));
        assert_eq!(
            parse("ecdsa-with-SHA256"),
            CsrAttr::Oid(oid("1.2.840.10045.4.3.2"))
        );
        assert_eq!(
            parse("ecdsa-with-SHA384"),
            CsrAttr::Oid(oid("1.2.840.10045.4.3.3"))
        );
        assert_eq!(
            parse("sha256WithRSAEncryption"),
            CsrAttr::Oid(oid("1.2.840.113549.1.1.11"))
        );
        assert_eq!(parse("ecPublicKey"), CsrAttr::Oid(oid("1.2.840.10045.2.1")));
        let p256 = CsrAttr::Attribute {
            oid: oid("1.2.840.10045.2.1"),
            values: vec![oid("1.2.840.10045.3.1.7")],
        };
        assert_eq!(parse("ecPublicKey=secp256r1"), p256);
        assert_eq!(parse("ecPublicKey=prime256v1"), p256);
        assert_eq!(parse("1.2.840.10045.2.1 = 1.2.840.10045.3.1.7"), p256);
        assert_eq!(
            parse("1.2.840.10045.2.1=1.3.132.0.34"),
            parse("ecPublicKey=secp384r1")
        );
        assert_eq!(
            parse("ecPublicKey=secp256r1, secp384r1"),
            CsrAttr::Attribute {
                oid: oid("1.2.840.10045.2.1"),
                values: vec![oid("1.2.840.10045.3.1.7"), oid("1.3.132.0.34")],
            }
        );
    }

    #[test]
    fn refuses_bad_config_strings() {
        for bad in [
            "",
            "  ",
            "nope",
            "1",
            "1.2.",
            ".1.2",
            "1..2",
            "3.1",
            "1.2.x",
            "ecPublicKey=",
            "=secp256r1",
            "ecPublicKey=secp256r1,",
            "ecPublicKey=secp256r1,,secp384r1",
            "ecPublicKey=secp256r1,prime256v1",
            "ecPublicKey=secp256r1=x",
            "1.2.99999999999999999999999999999999999999",
            "chall\u{e9}ngePassword",
            "1.2.4294967296",
            "1.2.3",
            "1.40.1",
            "1.2.+3",
            "1.2.-3",
            &format!("1.2{}", ".1".repeat(40)),
        ] {
            assert!(parse_csr_attr(bad).is_err(), "{bad:?}");
        }
        let err = parse_csr_attr("nope").err().unwrap_or_default();
        assert!(err.contains("challengePassword"), "{err}");
    }

    #[test]
    fn encodes_arcs_exactly() {
        // Arcs at base-128 boundaries (const-oid 0.9's parser gets 128 and 16384 wrong).
        for (dotted, der) in [
            ("1.2.3.127", &[0x2a, 0x03, 0x7f][..]),
            ("1.2.3.128", &[0x2a, 0x03, 0x81, 0x00]),
            ("1.2.3.129", &[0x2a, 0x03, 0x81, 0x01]),
            ("1.2.3.16383", &[0x2a, 0x03, 0xff, 0x7f]),
            ("1.2.3.16384", &[0x2a, 0x03, 0x81, 0x80, 0x00]),
            ("1.2.3.268435455", &[0x2a, 0x03, 0xff, 0xff, 0xff, 0x7f]),
            ("2.39.0.0", &[0x77, 0x00, 0x00]),
            ("0.0.0.0", &[0x00, 0x00, 0x00]),
            (
                "1.3.6.1.4.1.311.21.8",
                &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x15, 0x08],
            ),
        ] {
            let CsrAttr::Oid(parsed) = parse(dotted) else {
                panic!("{dotted}");
            };
            assert_eq!(parsed.as_bytes(), der, "{dotted}");
            assert_eq!(parsed.to_string(), dotted);
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "challengePassword",
            "ecPublicKey=secp256r1,secp384r1",
            "1.3.6.1.4.1.1.2",
        ] {
            let attr = parse(s);
            assert_eq!(parse(&attr.to_string()), attr);
        }
        assert_eq!(
            parse("ecPublicKey=secp384r1").to_string(),
            "1.2.840.10045.2.1=1.3.132.0.34"
        );
    }

    #[test]
    fn matches_the_rfc_7030_example() {
        // RFC 7030 section 4.5.2: challengePassword, an EC key on secp384r1, the MAC address
        // extension request, and ecdsa-with-SHA384.
        let rfc = base64::engine::general_purpose::STANDARD
            .decode(
                "MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ\
                 BgcrBgEBAQEWBggqhkjOPQQDAw==",
            )
            .expect("base64");
        let attrs: Vec<CsrAttr> = [
            "challengePassword",
            "ecPublicKey=secp384r1",
            "extensionRequest=1.3.6.1.1.1.1.22",
            "ecdsa-with-SHA384",
        ]
        .into_iter()
        .map(parse)
        .collect();
        assert_eq!(encode_csrattrs(&attrs), rfc);
        assert_eq!(decode(&rfc), attrs);
    }

    #[test]
    fn encoding_details() {
        assert_eq!(encode_csrattrs(&[]), vec![0x30, 0x00]);
        // Values are a DER SET OF: sorted by encoding (the shorter secp384r1 first),
        // duplicates dropped.
        let unsorted = CsrAttr::Attribute {
            oid: oid("1.2.840.10045.2.1"),
            values: vec![
                oid("1.2.840.10045.3.1.7"),
                oid("1.3.132.0.34"),
                oid("1.3.132.0.34"),
            ],
        };
        let der = encode_csrattrs(&[unsorted]);
        assert_eq!(
            decode(&der),
            vec![CsrAttr::Attribute {
                oid: oid("1.2.840.10045.2.1"),
                values: vec![oid("1.3.132.0.34"), oid("1.2.840.10045.3.1.7")],
            }]
        );
        let empty = CsrAttr::Attribute {
            oid: oid("1.2.840.10045.2.1"),
            values: Vec::new(),
        };
        assert_eq!(
            decode(&encode_csrattrs(&[empty])),
            vec![CsrAttr::Oid(oid("1.2.840.10045.2.1"))]
        );
        // Order of the items is kept.
        let items = vec![parse("ecdsa-with-SHA384"), parse("challengePassword")];
        assert_eq!(decode(&encode_csrattrs(&items)), items);
    }

    #[test]
    fn openssl_parses_it() {
        if !Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            // A missing openssl fails the cross-check unless explicitly opted out.
            assert!(
                std::env::var("EDGE_EST_SKIP_MISSING_TOOLS").is_ok_and(|v| v == "1"),
                "openssl is not installed (apt-get install openssl); set \
                 EDGE_EST_SKIP_MISSING_TOOLS=1 to skip the OpenSSL cross-checks"
            );
            eprintln!("SKIPPED (EDGE_EST_SKIP_MISSING_TOOLS=1): the OpenSSL cross-check");
            return;
        }
        let attrs: Vec<CsrAttr> = [
            "challengePassword",
            "ecPublicKey=secp256r1",
            "ecdsa-with-SHA256",
        ]
        .into_iter()
        .map(parse)
        .collect();
        let der = encode_csrattrs(&attrs);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("csrattrs.der");
        std::fs::write(&path, &der).expect("write");
        let out = Command::new("openssl")
            .args(["asn1parse", "-inform", "DER", "-in"])
            .arg(&path)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        // "offset:d=depth hl=.. l=.. kind: TYPE :value" -> (depth, type and value)
        let lines: Vec<(String, String)> = text
            .lines()
            .filter_map(|line| {
                let (_, rest) = line.split_once("d=")?;
                let (depth, rest) = rest.split_once(' ')?;
                let (_, what) = rest.split_once(": ")?;
                Some((
                    depth.to_owned(),
                    what.split_whitespace().collect::<Vec<_>>().join(" "),
                ))
            })
            .collect();
        let expected = [
            ("0", "SEQUENCE"),
            ("1", "OBJECT :challengePassword"),
            ("1", "SEQUENCE"),
            ("2", "OBJECT :id-ecPublicKey"),
            ("2", "SET"),
            ("3", "OBJECT :prime256v1"),
            ("1", "OBJECT :ecdsa-with-SHA256"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(d, w)| ((*d).to_owned(), (*w).to_owned()))
            .collect();
        assert_eq!(lines, expected, "{text}");
    }
}
