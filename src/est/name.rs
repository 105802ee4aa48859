//! Subjects and subject alternative names, as read from CSRs and client certificates.
//!
//! Values are kept as decoded text, not as their ASN.1 encodings: a renewal CSR made by OpenSSL
//! may encode a name as UTF8String where we issued a PrintableString, and the two must compare
//! equal. The order of attributes and their grouping into RDNs are kept exactly as encoded,
//! because an issued subject must be written back faithfully (repeated types such as
//! `DC=contoso,DC=com` included).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use x509_parser::asn1_rs::{Any, Class, Oid, Tag};
use x509_parser::extensions::GeneralName;
use x509_parser::x509::X509Name;

/// The type of one attribute of a distinguished name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttributeType {
    CommonName,
    Organization,
    OrganizationalUnit,
    Country,
    State,
    Locality,
    DomainComponent,
    SerialNumber,
    EmailAddress,
    /// Any other attribute type, as a dotted OID.
    Other(String),
}

impl AttributeType {
    /// The attribute type for a dotted OID.
    pub fn from_oid(oid: &str) -> AttributeType {
        match oid {
            "2.5.4.3" => AttributeType::CommonName,
            "2.5.4.10" => AttributeType::Organization,
            "2.5.4.11" => AttributeType::OrganizationalUnit,
            "2.5.4.6" => AttributeType::Country,
            "2.5.4.8" => AttributeType::State,
            "2.5.4.7" => AttributeType::Locality,
            "0.9.2342.19200300.100.1.25" => AttributeType::DomainComponent,
            "2.5.4.5" => AttributeType::SerialNumber,
            "1.2.840.113549.1.9.1" => AttributeType::EmailAddress,
            other => AttributeType::Other(other.to_owned()),
        }
    }

    /// The dotted OID of this attribute type.
    pub fn oid(&self) -> &str {
        match self {
            AttributeType::CommonName => "2.5.4.3",
            AttributeType::Organization => "2.5.4.10",
            AttributeType::OrganizationalUnit => "2.5.4.11",
            AttributeType::Country => "2.5.4.6",
            AttributeType::State => "2.5.4.8",
            AttributeType::Locality => "2.5.4.7",
            AttributeType::DomainComponent => "0.9.2342.19200300.100.1.25",
            AttributeType::SerialNumber => "2.5.4.5",
            AttributeType::EmailAddress => "1.2.840.113549.1.9.1",
            AttributeType::Other(oid) => oid,
        }
    }

    /// The short name used in string forms (`CN`, `O`, ...), or the dotted OID.
    pub fn short_name(&self) -> &str {
        match self {
            AttributeType::CommonName => "CN",
            AttributeType::Organization => "O",
            AttributeType::OrganizationalUnit => "OU",
            AttributeType::Country => "C",
            AttributeType::State => "ST",
            AttributeType::Locality => "L",
            AttributeType::DomainComponent => "DC",
            AttributeType::SerialNumber => "serialNumber",
            AttributeType::EmailAddress => "emailAddress",
            AttributeType::Other(oid) => oid,
        }
    }
}

impl fmt::Display for AttributeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// A distinguished name: attributes in encoded (RDN) order with their values as text.
///
/// Equality compares attribute types, values and RDN grouping, never the string encodings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Subject {
    attributes: Vec<(AttributeType, String)>,
    multi_valued: bool,
    /// Number of attributes in each RDN, in order; sums to `attributes.len()`. Kept so that a
    /// multi-valued RDN (`CN=a+OU=b`) can be shown and re-encoded as it was received.
    rdn_sizes: Vec<usize>,
}

impl Subject {
    /// Reads a name. Fails, saying which attribute, when a value is not a text string.
    ///
    /// The Name's encoding is checked strictly first ([`check_name_der`]): x509-parser, through
    /// asn1-rs, would read an INTEGER holding OID bytes as an attribute type.
    pub fn from_x509_name(name: &X509Name<'_>) -> Result<Subject, String> {
        check_name_der(name.as_raw(), "subject")?;
        let mut attributes = Vec::new();
        let mut rdn_sizes = Vec::new();
        for rdn in name.iter_rdn() {
            let mut size = 0usize;
            for atv in rdn.iter() {
                let oid = dotted_oid(atv.attr_type())
                    .ok_or_else(|| "a subject attribute type is not a valid OID".to_owned())?;
                let attr_type = AttributeType::from_oid(&oid);
                let value = decode_directory_string(atv.attr_value())
                    .map_err(|why| format!("the value of subject attribute {attr_type} {why}"))?;
                attributes.push((attr_type, value));
                size += 1;
            }
            // x509-parser refuses empty RDN sets; guard anyway so rdn_sizes stays meaningful.
            if size > 0 {
                rdn_sizes.push(size);
            }
        }
        let multi_valued = rdn_sizes.iter().any(|&n| n > 1);
        Ok(Subject {
            attributes,
            multi_valued,
            rdn_sizes,
        })
    }

    /// A subject with one attribute per RDN, in the given order.
    pub fn from_attributes(attributes: Vec<(AttributeType, String)>) -> Subject {
        let rdn_sizes = vec![1; attributes.len()];
        Subject {
            attributes,
            multi_valued: false,
            rdn_sizes,
        }
    }

    /// All attributes in encoded order (RDN by RDN).
    pub fn attributes(&self) -> &[(AttributeType, String)] {
        &self.attributes
    }

    /// The RDNs in encoded order, each a slice of its attributes (more than one only in a
    /// multi-valued RDN).
    pub fn rdns(&self) -> impl Iterator<Item = &[(AttributeType, String)]> + '_ {
        let mut rest: &[(AttributeType, String)] = &self.attributes;
        self.rdn_sizes.iter().map(move |&n| {
            let (rdn, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            rdn
        })
    }

    /// Every common name, in encoded order.
    pub fn common_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.attributes
            .iter()
            .filter(|(t, _)| *t == AttributeType::CommonName)
            .map(|(_, v)| v.as_str())
    }

    /// The common name when there is exactly one; `None` when there is none or several
    /// (several CNs are ambiguous for authorization).
    pub fn common_name(&self) -> Option<&str> {
        let mut names = self.common_names();
        match (names.next(), names.next()) {
            (Some(cn), None) => Some(cn),
            _ => None,
        }
    }

    /// Whether some attribute type occurs more than once (e.g. `DC=contoso,DC=com`).
    pub fn has_repeated_types(&self) -> bool {
        self.attributes
            .iter()
            .enumerate()
            .any(|(i, (t, _))| self.attributes.iter().skip(i + 1).any(|(u, _)| u == t))
    }

    /// Whether some RDN holds more than one attribute (`CN=a+OU=b`).
    pub fn is_multi_valued(&self) -> bool {
        self.multi_valued
    }

    /// Whether the name has no attribute at all.
    pub fn is_empty(&self) -> bool {
        self.attributes.is_empty()
    }
}

/// RFC 4514-style text such as `CN=child1,O=Contoso`, but in encoded order (RFC 4514 itself
/// reverses it), with `+` joining the attributes of a multi-valued RDN.
impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rdn) in self.rdns().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            for (j, (attr_type, value)) in rdn.iter().enumerate() {
                if j > 0 {
                    f.write_str("+")?;
                }
                write!(f, "{}=", attr_type.short_name())?;
                write_rfc4514_value(f, value)?;
            }
        }
        Ok(())
    }
}

fn write_rfc4514_value(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            write!(f, "\\{c}")?;
        } else if is_deceptive(c) {
            // Hex-escape control and format characters so a name can never forge log lines
            // or reorder the text around it (U+202E).
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                write!(f, "\\{b:02X}")?;
            }
        } else {
            write!(f, "{c}")?;
        }
    }
    Ok(())
}

/// Whether `c` must be escaped when client-supplied text is shown: a control character, a
/// format character (Unicode category Cf: bidirectional controls such as U+202E and U+2066–2069,
/// zero-width characters, U+FEFF, tag characters, ...) or a line or paragraph separator. Such
/// characters are invisible or reorder the text around them, so a refusal text or log line
/// could otherwise be made to read as something else.
pub(crate) fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
        )
}

/// Decodes a DirectoryString (or IA5String etc.) to text. The error completes a sentence
/// starting with "the value of ...".
fn decode_directory_string(value: &Any<'_>) -> Result<String, String> {
    if value.class() != Class::Universal {
        return Err(format!("has a non-universal ASN.1 tag [{}]", value.tag().0));
    }
    let data = value.data;
    let text = match value.tag() {
        // PrintableString, IA5String, NumericString and VisibleString are ASCII subsets of
        // UTF-8; like x509-parser, accept any UTF-8 in them because some tools ignore the charset.
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString => std::str::from_utf8(data)
            .map(str::to_owned)
            .map_err(|_| "is not valid UTF-8".to_owned())?,
        // TeletexString is read as Latin-1, as OpenSSL and most tools do in practice.
        Tag::TeletexString => data.iter().map(|&b| char::from(b)).collect(),
        Tag::BmpString => {
            if data.len() % 2 != 0 {
                return Err("is a BMPString of odd length".to_owned());
            }
            let units = data.chunks_exact(2).map(be_u16);
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .map_err(|_| "is a BMPString with invalid UTF-16".to_owned())?
        }
        Tag::UniversalString => {
            if data.len() % 4 != 0 {
                return Err("is a UniversalString whose length is not a multiple of 4".to_owned());
            }
            data.chunks_exact(4)
                .map(|quad| char::from_u32(be_u32(quad)))
                .collect::<Option<String>>()
                .ok_or_else(|| "is a UniversalString with an invalid character".to_owned())?
        }
        other => return Err(format!("is not a text string (ASN.1 tag {})", other.0)),
    };
    // A NUL inside a name is the classic way to make "a\0.evil.example" look like "a".
    if text.contains('\0') {
        return Err("contains a NUL character".to_owned());
    }
    Ok(text)
}

/// The dotted form of an OID, or `None` when its encoding is invalid (empty, a truncated or
/// non-minimal arc, an arc over 128 bits). asn1-rs's `to_id_string` skips such defects, which
/// would let a malformed OID pass for a well-known one.
pub(crate) fn dotted_oid(oid: &Oid<'_>) -> Option<String> {
    let bytes = oid.as_bytes();
    if bytes.last().is_none_or(|&b| b & 0x80 != 0) {
        return None;
    }
    let mut arcs: Vec<u128> = Vec::new();
    let mut value: u128 = 0;
    let mut at_arc_start = true;
    for &b in bytes {
        if at_arc_start && b == 0x80 {
            return None;
        }
        value = value.checked_mul(128)? | u128::from(b & 0x7f);
        at_arc_start = b & 0x80 == 0;
        if at_arc_start {
            arcs.push(value);
            value = 0;
        }
    }
    let (&first, rest) = arcs.split_first()?;
    // The first subidentifier packs the first two arcs (X.690 8.19.4).
    let (a, b) = match first {
        0..=39 => (0, first),
        40..=79 => (1, first - 40),
        _ => (2, first - 80),
    };
    let mut dotted = format!("{a}.{b}");
    for arc in rest {
        dotted.push('.');
        dotted.push_str(&arc.to_string());
    }
    Some(dotted)
}

// --- strict DER ---------------------------------------------------------------------------------
//
// asn1-rs 0.7 reads any primitive element as an OBJECT IDENTIFIER (`TryFrom<&Any> for Oid`
// never checks the tag), so the structures x509-parser hands us are checked again here, tag by
// tag, before their OIDs are believed.

pub(crate) const TAG_BOOLEAN: u8 = 0x01;
pub(crate) const TAG_INTEGER: u8 = 0x02;
pub(crate) const TAG_BIT_STRING: u8 = 0x03;
pub(crate) const TAG_OCTET_STRING: u8 = 0x04;
pub(crate) const TAG_OID: u8 = 0x06;
pub(crate) const TAG_SEQUENCE: u8 = 0x30;
pub(crate) const TAG_SET: u8 = 0x31;
/// `[0]` constructed (PKCS#10 attributes, GeneralName otherName and its value).
pub(crate) const TAG_CONTEXT_0: u8 = 0xa0;
/// `[4]` constructed (GeneralName directoryName, an explicitly tagged Name).
pub(crate) const TAG_CONTEXT_4: u8 = 0xa4;

/// One DER element: its identifier octet and its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tlv<'a> {
    pub(crate) tag: u8,
    pub(crate) contents: &'a [u8],
}

/// Splits `input` into the DER elements it consists of, strictly: tag numbers below 31,
/// definite lengths in their shortest form, SEQUENCE and SET constructed and the other
/// universal types primitive. The error says what is wrong. Nothing is descended into.
pub(crate) fn der_elements(mut input: &[u8]) -> Result<Vec<Tlv<'_>>, &'static str> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = input.split_first() {
        if tag & 0x1f == 0x1f {
            return Err("a tag number above 30");
        }
        if tag & 0xc0 == 0 {
            let constructed = tag & 0x20 != 0;
            let sound = match tag & 0x1f {
                0 => false, // end-of-contents: DER has no indefinite lengths
                16 | 17 => constructed,
                8 | 11 | 29 => true, // EXTERNAL, EMBEDDED PDV, CHARACTER STRING
                _ => !constructed,
            };
            if !sound {
                return Err("a universal tag with the wrong constructed bit");
            }
        }
        let (&first, rest) = rest.split_first().ok_or("a missing length")?;
        let (len, rest) = match first {
            0..=0x7f => (usize::from(first), rest),
            0x80 => return Err("an indefinite length"),
            0x81..=0x84 => {
                let (bytes, rest) = rest
                    .split_at_checked(usize::from(first & 0x7f))
                    .ok_or("a truncated length")?;
                let len = bytes.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
                if bytes.first() == Some(&0) || len < 0x80 {
                    return Err("a length not in its shortest form");
                }
                (
                    usize::try_from(len).map_err(|_| "a length too large")?,
                    rest,
                )
            }
            _ => return Err("a length too large"),
        };
        let (contents, next) = rest
            .split_at_checked(len)
            .ok_or("a length beyond the end of its container")?;
        out.push(Tlv { tag, contents });
        input = next;
    }
    Ok(out)
}

/// The contents of `tlv` when it carries tag `want`; otherwise an error saying what `what()`
/// (e.g. "the type of subject attribute #1") is instead.
pub(crate) fn expect_tag<'a>(
    tlv: &Tlv<'a>,
    want: u8,
    what: impl FnOnce() -> String,
) -> Result<&'a [u8], String> {
    if tlv.tag == want {
        Ok(tlv.contents)
    } else {
        Err(format!(
            "{} is {} instead of {}",
            what(),
            tag_name(tlv.tag),
            tag_name(want)
        ))
    }
}

fn tag_name(tag: u8) -> String {
    let name = match tag {
        TAG_BOOLEAN => "a BOOLEAN",
        TAG_INTEGER => "an INTEGER",
        TAG_BIT_STRING => "a BIT STRING",
        TAG_OCTET_STRING => "an OCTET STRING",
        0x05 => "a NULL",
        TAG_OID => "an OBJECT IDENTIFIER",
        0x0c => "a UTF8String",
        0x13 => "a PrintableString",
        0x16 => "an IA5String",
        TAG_SEQUENCE => "a SEQUENCE",
        TAG_SET => "a SET",
        _ => return format!("an element with tag 0x{tag:02x}"),
    };
    format!("{name} (0x{tag:02x})")
}

/// Checks the DER encoding of a Name (one element, nothing after it); see [`check_name`].
pub(crate) fn check_name_der(der: &[u8], what: &str) -> Result<(), String> {
    let elements = der_elements(der).map_err(|why| format!("the {what} is not DER ({why})"))?;
    match elements.as_slice() {
        [name] => check_name(name, what),
        _ => Err(format!("the {what} is not a single Name")),
    }
}

/// Checks a Name strictly: a SEQUENCE of non-empty SETs of SEQUENCE { OBJECT IDENTIFIER, ANY },
/// in DER, every attribute type tagged 0x06. `what` names it in errors ("subject").
pub(crate) fn check_name(name: &Tlv<'_>, what: &str) -> Result<(), String> {
    let elements = |der| der_elements(der).map_err(|why| format!("the {what} is not DER ({why})"));
    let rdns = elements(expect_tag(name, TAG_SEQUENCE, || format!("the {what}"))?)?;
    let mut index = 0usize;
    for rdn in &rdns {
        let atvs = elements(expect_tag(rdn, TAG_SET, || {
            format!("an RDN of the {what}")
        })?)?;
        if atvs.is_empty() {
            return Err(format!("the {what} has an empty RDN"));
        }
        for atv in &atvs {
            index += 1;
            let fields = elements(expect_tag(atv, TAG_SEQUENCE, || {
                format!("attribute #{index} of the {what}")
            })?)?;
            let [attr_type, _value] = fields.as_slice() else {
                return Err(format!(
                    "attribute #{index} of the {what} is not exactly a type and a value"
                ));
            };
            expect_tag(attr_type, TAG_OID, || {
                format!("the type of attribute #{index} of the {what}")
            })?;
        }
    }
    Ok(())
}

fn shown_oid(oid: &Oid<'_>) -> String {
    dotted_oid(oid).unwrap_or_else(|| "(malformed OID)".to_owned())
}

fn be_u16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u16::from(b))
}

fn be_u32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0, |acc, &b| (acc << 8) | u32::from(b))
}

/// One subject alternative name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SanEntry {
    Dns(String),
    Ip(IpAddr),
    Uri(String),
    Email(String),
    /// Any other or undecodable name, described, e.g. `otherName 1.3.6.1.4.1.311.20.2.3`.
    Other(String),
}

impl fmt::Display for SanEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, value) = match self {
            SanEntry::Dns(v) => ("DNS:", v.as_str()),
            SanEntry::Ip(ip) => return write!(f, "IP:{ip}"),
            SanEntry::Uri(v) => ("URI:", v.as_str()),
            SanEntry::Email(v) => ("email:", v.as_str()),
            SanEntry::Other(v) => ("other:", v.as_str()),
        };
        f.write_str(prefix)?;
        // Names come from clients: escape control and format characters so they cannot forge
        // log lines or reorder the text around them.
        for c in value.chars() {
            if is_deceptive(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// Converts parsed GeneralNames, keeping their order. Names we do not model, and names that
/// are malformed (an IP address of the wrong length, a non-UTF-8 DNS name), become
/// [`SanEntry::Other`] so a policy can see and refuse them.
pub fn sans_from_general_names(names: &[GeneralName<'_>]) -> Vec<SanEntry> {
    names.iter().map(san_from_general_name).collect()
}

fn san_from_general_name(name: &GeneralName<'_>) -> SanEntry {
    match name {
        GeneralName::DNSName(s) => SanEntry::Dns((*s).to_owned()),
        GeneralName::URI(s) => SanEntry::Uri((*s).to_owned()),
        GeneralName::RFC822Name(s) => SanEntry::Email((*s).to_owned()),
        GeneralName::IPAddress(bytes) => {
            if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                SanEntry::Ip(IpAddr::V4(Ipv4Addr::from(v4)))
            } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                SanEntry::Ip(IpAddr::V6(Ipv6Addr::from(v6)))
            } else {
                SanEntry::Other(format!("invalid IP address of {} bytes", bytes.len()))
            }
        }
        GeneralName::OtherName(oid, _) => SanEntry::Other(format!("otherName {}", shown_oid(oid))),
        GeneralName::DirectoryName(dn) => match Subject::from_x509_name(dn) {
            Ok(subject) => SanEntry::Other(format!("dirName {subject}")),
            Err(_) => SanEntry::Other("dirName (undecodable)".to_owned()),
        },
        GeneralName::RegisteredID(oid) => {
            SanEntry::Other(format!("registeredID {}", shown_oid(oid)))
        }
        GeneralName::X400Address(_) => SanEntry::Other("x400Address".to_owned()),
        GeneralName::EDIPartyName(_) => SanEntry::Other("ediPartyName".to_owned()),
        GeneralName::Invalid(tag, _) => {
            SanEntry::Other(format!("invalid name with tag [{}]", tag.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer;

    /// (OID content bytes, string tag, value bytes) of one attribute.
    type Atv<'a> = (&'a [u8], u8, &'a [u8]);

    /// DER of a Name from RDNs of attributes.
    fn name_der(rdns: &[&[Atv<'_>]]) -> Vec<u8> {
        fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
            assert!(content.len() < 128);
            let mut v = vec![tag, content.len() as u8];
            v.extend_from_slice(content);
            v
        }
        let mut name = Vec::new();
        for rdn in rdns {
            let mut set = Vec::new();
            for (oid, tag, value) in rdn.iter() {
                let mut atv = tlv(0x06, oid);
                atv.extend(tlv(*tag, value));
                set.extend(tlv(0x30, &atv));
            }
            name.extend(tlv(0x31, &set));
        }
        tlv(0x30, &name)
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const OU: &[u8] = &[0x55, 0x04, 0x0b];

    fn parse(der: &[u8]) -> Result<Subject, String> {
        let (rest, name) = X509Name::from_der(der).map_err(|e| e.to_string())?;
        assert!(rest.is_empty());
        Subject::from_x509_name(&name)
    }

    #[test]
    fn printable_and_utf8_encodings_compare_equal() {
        let printable = parse(&name_der(&[
            &[(CN, 0x13, b"child1")],
            &[(O, 0x13, b"Contoso")],
        ]))
        .unwrap();
        let utf8 = parse(&name_der(&[
            &[(CN, 0x0c, b"child1")],
            &[(O, 0x0c, b"Contoso")],
        ]))
        .unwrap();
        assert_eq!(printable, utf8);
        assert_eq!(printable.to_string(), "CN=child1,O=Contoso");
        assert_eq!(printable.common_name(), Some("child1"));
        let reordered = parse(&name_der(&[
            &[(O, 0x0c, b"Contoso")],
            &[(CN, 0x0c, b"child1")],
        ]))
        .unwrap();
        assert_ne!(printable, reordered);
    }

    #[test]
    fn decodes_teletex_bmp_and_universal_strings() {
        let s = parse(&name_der(&[
            &[(CN, 0x14, b"caf\xe9")],
            &[(O, 0x1e, &[0x00, b'a', 0x00, 0xe9])],
            &[(OU, 0x1c, &[0, 0, 0, b'x', 0, 1, 0xf6, 0x00])],
        ]))
        .unwrap();
        let values: Vec<&str> = s.attributes().iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(values, ["café", "aé", "x\u{1f600}"]);
    }

    #[test]
    fn refuses_values_that_are_not_text() {
        let err = parse(&name_der(&[&[(CN, 0x04, b"\x01\x02")]])).unwrap_err();
        assert!(
            err.contains("CN") && err.contains("not a text string"),
            "{err}"
        );
        let err = parse(&name_der(&[&[(CN, 0x1e, b"\x00a\x00")]])).unwrap_err();
        assert!(err.contains("odd length"), "{err}");
        let err = parse(&name_der(&[&[(CN, 0x0c, b"a\x00b")]])).unwrap_err();
        assert!(err.contains("NUL"), "{err}");
    }

    #[test]
    fn repeated_types_multi_valued_and_escaping() {
        let s = parse(&name_der(&[
            &[(CN, 0x0c, b"x")],
            &[(OU, 0x0c, b"a")],
            &[(OU, 0x0c, b"b")],
        ]))
        .unwrap();
        assert!(s.has_repeated_types());
        assert!(!s.is_multi_valued());
        assert_eq!(s.to_string(), "CN=x,OU=a,OU=b");

        let two_cns = parse(&name_der(&[&[(CN, 0x0c, b"a")], &[(CN, 0x0c, b"b")]])).unwrap();
        assert_eq!(two_cns.common_name(), None);
        assert_eq!(two_cns.common_names().collect::<Vec<_>>(), ["a", "b"]);

        let odd = Subject::from_attributes(vec![
            (
                AttributeType::CommonName,
                " #a,b+c=\"d\"\\<e>;f ".to_owned(),
            ),
            (
                AttributeType::Other("1.2.3.4".to_owned()),
                "#x\ny".to_owned(),
            ),
        ]);
        assert_eq!(
            odd.to_string(),
            r#"CN=\ #a\,b\+c\=\"d\"\\\<e\>\;f\ ,1.2.3.4=\#x\0Ay"#
        );
        assert!(Subject::default().is_empty());
        assert_eq!(Subject::default().to_string(), "");
    }

    #[test]
    fn dotted_oids_are_strict() {
        let oid = |bytes: &[u8]| dotted_oid(&Oid::new(bytes.to_vec().into()));
        assert_eq!(oid(&[0x55, 0x04, 0x03]).as_deref(), Some("2.5.4.3"));
        assert_eq!(
            oid(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]).as_deref(),
            Some("1.2.840.10045.4.3.2")
        );
        assert_eq!(
            oid(&[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19]).as_deref(),
            Some("0.9.2342.19200300.100.1.25")
        );
        assert_eq!(
            oid(&[0x69, 0x83, 0x49, 0x64]).as_deref(),
            Some("2.25.457.100")
        );
        assert_eq!(oid(&[]), None);
        assert_eq!(oid(&[0x2a, 0x86]), None);
        assert_eq!(oid(&[0x2a, 0x80, 0x01]), None);
        assert_eq!(oid(&[0xff; 30]), None);
    }

    #[test]
    fn attribute_type_names_round_trip() {
        for t in [
            AttributeType::CommonName,
            AttributeType::Organization,
            AttributeType::OrganizationalUnit,
            AttributeType::Country,
            AttributeType::State,
            AttributeType::Locality,
            AttributeType::DomainComponent,
            AttributeType::SerialNumber,
            AttributeType::EmailAddress,
            AttributeType::Other("1.2.3".to_owned()),
        ] {
            assert_eq!(AttributeType::from_oid(t.oid()), t);
        }
        assert_eq!(AttributeType::DomainComponent.short_name(), "DC");
        assert_eq!(AttributeType::EmailAddress.short_name(), "emailAddress");
    }

    #[test]
    fn san_entries_from_general_names() {
        let oid = x509_parser::oid_registry::OID_PKCS9_EMAIL_ADDRESS;
        let names = [
            GeneralName::DNSName("edge.example"),
            GeneralName::IPAddress(&[10, 0, 0, 1]),
            GeneralName::IPAddress(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            GeneralName::IPAddress(&[1, 2, 3]),
            GeneralName::URI("spiffe://x/y"),
            GeneralName::RFC822Name("a@b.example"),
            GeneralName::OtherName(oid, &[]),
            GeneralName::DNSName("evil\nline"),
        ];
        let sans = sans_from_general_names(&names);
        let shown: Vec<String> = sans.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "DNS:edge.example",
                "IP:10.0.0.1",
                "IP:::1",
                "other:invalid IP address of 3 bytes",
                "URI:spiffe://x/y",
                "email:a@b.example",
                "other:otherName 1.2.840.113549.1.9.1",
                "DNS:evil\\nline",
            ]
        );
    }

    #[test]
    fn attribute_types_must_be_tagged_as_oids() {
        // CN=d with the attribute type tagged INTEGER; x509-parser reads it as 2.5.4.3.
        let der = [
            &[0x30, 0x0c, 0x31, 0x0a, 0x30, 0x08, 0x02, 0x03][..],
            CN,
            &[0x0c, 0x01, b'd'],
        ]
        .concat();
        assert_eq!(
            parse(&der).unwrap_err(),
            "the type of attribute #1 of the subject is an INTEGER (0x02) \
             instead of an OBJECT IDENTIFIER (0x06)"
        );
        let mut good = der.clone();
        good[6] = 0x06;
        assert_eq!(parse(&good).unwrap().to_string(), "CN=d");
        // An ATV with a third element.
        let der = [
            &[0x30, 0x0e, 0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03][..],
            CN,
            &[0x0c, 0x01, b'd', 0x05, 0x00],
        ]
        .concat();
        let err = check_name_der(&der, "subject").unwrap_err();
        assert_eq!(
            err,
            "attribute #1 of the subject is not exactly a type and a value"
        );
        assert!(check_name_der(&[0x30, 0x02, 0x31, 0x00], "subject")
            .unwrap_err()
            .contains("empty RDN"));
        assert!(check_name_der(&[0x31, 0x00], "subject")
            .unwrap_err()
            .contains("is a SET (0x31) instead of a SEQUENCE (0x30)"));
    }

    #[test]
    fn der_elements_are_strict() {
        let tlv = |tag, contents| Tlv { tag, contents };
        assert_eq!(
            der_elements(&[0x02, 0x01, 0x05, 0x04, 0x00]),
            Ok(vec![tlv(0x02, &[0x05][..]), tlv(0x04, &[][..])])
        );
        let long = [&[0x04, 0x81, 0x80][..], &[0u8; 0x80]].concat();
        assert_eq!(der_elements(&long), Ok(vec![tlv(0x04, &[0u8; 0x80][..])]));
        let refused: [(&[u8], &str); 11] = [
            (&[0x04, 0x81, 0x01, 0x00], "shortest form"),
            (&[0x04, 0x82, 0x00, 0x80], "shortest form"),
            (&[0x30, 0x80, 0x00, 0x00], "indefinite"),
            (&[0x1f, 0x21, 0x00], "tag number"),
            (&[0x26, 0x00], "constructed bit"),
            (&[0x10, 0x00], "constructed bit"),
            (&[0x00, 0x00], "constructed bit"),
            (&[0x04], "missing length"),
            (&[0x04, 0x82, 0x01], "truncated length"),
            (&[0x04, 0x02, 0x00], "beyond the end"),
            (&[0x04, 0x85, 1, 0, 0, 0, 0], "too large"),
        ];
        for (der, why) in refused {
            let err = der_elements(der).unwrap_err();
            assert!(err.contains(why), "{der:02x?}: {err}");
        }
        // Context-specific and application tags may be either form.
        assert!(der_elements(&[0xa0, 0x00, 0x80, 0x00, 0x41, 0x00]).is_ok());
    }

    #[test]
    fn format_characters_are_escaped() {
        let shown = |value: &str| {
            Subject::from_attributes(vec![(AttributeType::CommonName, value.to_owned())])
                .to_string()
        };
        assert_eq!(shown("gw\u{202e}1"), r"CN=gw\E2\80\AE1");
        assert_eq!(shown("a\u{200e}b\u{200f}"), r"CN=a\E2\80\8Eb\E2\80\8F");
        assert_eq!(
            shown("\u{2066}x\u{2069}\u{061c}"),
            r"CN=\E2\81\A6x\E2\81\A9\D8\9C"
        );
        assert_eq!(
            shown("\u{feff}\u{200b}\u{2028}"),
            r"CN=\EF\BB\BF\E2\80\8B\E2\80\A8"
        );
        assert_eq!(shown("\u{e0041}"), r"CN=\F3\A0\81\81");
        // Visible non-ASCII text is shown as it is.
        assert_eq!(shown("café Ωmega 東京"), "CN=café Ωmega 東京");
        for c in [
            '\u{202e}', '\u{200e}', '\u{2067}', '\u{061c}', '\u{ad}', '\u{7f}',
        ] {
            assert!(is_deceptive(c), "{c:?}");
        }
        for c in ['a', 'é', '\u{2070}', '\u{2010}', '\u{fe0f}'] {
            assert!(!is_deceptive(c), "{c:?}");
        }
        let san = SanEntry::Dns("a\u{202e}b".to_owned());
        assert_eq!(san.to_string(), "DNS:a\\u{202e}b");
    }
}
