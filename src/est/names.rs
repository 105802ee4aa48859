//! Name hygiene: the one place where every name a CSR asks for is checked before any policy
//! sees it. A name that passes here is well-formed; whether it is *allowed* is the policy's
//! business (`policy`).
//!
//! - DNS names (dNSName, and the domain of an email address): LDH labels of ASCII letters,
//!   digits and hyphens (internationalised names as A-labels, `xn--...`), 1 to 63 characters a
//!   label, no hyphen at either end of a label, 253 characters in all, no trailing dot. A
//!   wildcard is only ever a whole leftmost label `*` above at least two more labels
//!   (`*.plant.local`), and only in a dNSName; policy patterns allow it only where they write
//!   a literal asterisk `{*}` (see `policy::pattern`).
//! - Email addresses (rfc822Name): `local@domain`, the local part a dot-atom of RFC 5322
//!   `atext` (no quoted strings, no non-ASCII), at most 64 characters, the domain a DNS name;
//!   254 characters in all.
//! - URIs: ASCII, RFC 3986 characters only (`%` followed by two hex digits), a scheme, a
//!   non-empty rest; an authority (`scheme://...`) has a host (DNS name or IP literal) and no
//!   user information; 2048 characters at most.
//! - Subject attributes: never empty, no control character (C0, DEL, C1) and no invisible
//!   formatting character (U+200B..U+200F, U+202A..U+202E, U+2066..U+2069, ...), and the
//!   upper bounds of X.520 / RFC 5280: CN, O, OU and serialNumber 64 characters, L and ST
//!   128, C exactly 2, emailAddress 255 (and an email address), DC one DNS label; any other
//!   attribute 256.
//! - Subject alternative names: no control character either (a DNS name with `\0` is not LDH).
//!
//! Refusals say which name and why; a name is shown escaped and cut to [`SHOWN_CHARS`].

use std::fmt::Write;

use crate::est::name::{is_deceptive, AttributeType};
use crate::est::{SanEntry, Subject};

/// ub-common-name (X.520, RFC 5280 appendix A): 64 characters.
pub const MAX_COMMON_NAME_CHARS: usize = 64;
/// The longest DNS name in text form, without a trailing dot (RFC 1035: 255 octets on the wire).
pub const MAX_DNS_NAME: usize = 253;
/// The longest DNS label (RFC 1035).
pub const MAX_DNS_LABEL: usize = 63;
/// The longest email address (RFC 5321 path limit, less the angle brackets).
pub const MAX_EMAIL: usize = 254;
/// The longest email local part (RFC 5321).
pub const MAX_EMAIL_LOCAL: usize = 64;
/// The longest URI accepted in a certificate.
pub const MAX_URI: usize = 2048;
/// The longest value of a subject attribute without an upper bound of its own.
pub const MAX_OTHER_ATTRIBUTE: usize = 256;
/// How much of a refused name a refusal text shows.
pub const SHOWN_CHARS: usize = 80;

/// A requested name that is not well-formed. Answered with 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("subject attribute {attribute}={value} {reason}")]
    Subject {
        attribute: String,
        /// The value as shown: escaped and cut.
        value: String,
        reason: String,
    },
    #[error("subjectAltName {name} {reason}")]
    San {
        /// The name as shown: escaped and cut.
        name: String,
        reason: String,
    },
}

/// Checks every name of a request: subject attributes and subject alternative names.
pub fn check_requested_names(subject: &Subject, sans: &[SanEntry]) -> Result<(), NameError> {
    for (attribute, value) in subject.attributes() {
        check_attribute(attribute, value).map_err(|reason| NameError::Subject {
            attribute: attribute.short_name().to_owned(),
            value: shown(&format!("{value:?}")),
            reason,
        })?;
    }
    for san in sans {
        check_san(san).map_err(|reason| NameError::San {
            name: shown(&san.to_string()),
            reason,
        })?;
    }
    Ok(())
}

/// Checks one subject attribute value; the error completes "subject attribute X=... ".
pub fn check_attribute(attribute: &AttributeType, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".to_owned());
    }
    no_control_or_format(value)?;
    let chars = value.chars().count();
    let max = match attribute {
        AttributeType::CommonName
        | AttributeType::Organization
        | AttributeType::OrganizationalUnit
        | AttributeType::SerialNumber => MAX_COMMON_NAME_CHARS,
        AttributeType::State | AttributeType::Locality => 128,
        AttributeType::Country => {
            return if chars == 2 && value.chars().all(|c| c.is_ascii_alphabetic()) {
                Ok(())
            } else {
                Err("is not a two-letter country code".to_owned())
            }
        }
        AttributeType::EmailAddress => {
            return check_email(value).map_err(|why| format!("is not an email address: {why}"))
        }
        AttributeType::DomainComponent => {
            return check_label(value).map_err(|why| format!("is not a DNS label: {why}"))
        }
        AttributeType::Other(_) => MAX_OTHER_ATTRIBUTE,
    };
    if chars > max {
        return Err(format!(
            "is {chars} characters long; at most {max} are allowed (X.520 upper bound)"
        ));
    }
    Ok(())
}

/// Checks one subject alternative name; the error completes "subjectAltName X ".
pub fn check_san(san: &SanEntry) -> Result<(), String> {
    match san {
        SanEntry::Dns(name) => check_dns_name(name, Wildcard::Allowed)
            .map_err(|why| format!("is not a DNS name: {why}")),
        SanEntry::Email(address) => {
            check_email(address).map_err(|why| format!("is not an email address: {why}"))
        }
        SanEntry::Uri(uri) => check_uri(uri).map_err(|why| format!("is not a URI: {why}")),
        // Well-formed by construction; other kinds are the policy's to refuse (403).
        SanEntry::Ip(_) | SanEntry::Other(_) => Ok(()),
    }
}

/// Whether a DNS name may be a wildcard (`*` as its whole leftmost label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wildcard {
    Allowed,
    Refused,
}

/// Checks a DNS name in text form (see the module documentation). The error says why not.
pub fn check_dns_name(name: &str, wildcard: Wildcard) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii()) {
        return Err(format!(
            "it holds the non-ASCII character {}; internationalised names go as A-labels (xn--...)",
            describe_char(c)
        ));
    }
    if name.len() > MAX_DNS_NAME {
        return Err(format!(
            "it is {} characters long; at most {MAX_DNS_NAME} are allowed",
            name.len()
        ));
    }
    if name.ends_with('.') {
        return Err("it ends with a dot".to_owned());
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if *label == "*" {
            if wildcard == Wildcard::Refused {
                return Err("a wildcard is not allowed here".to_owned());
            }
            if i != 0 {
                return Err("a wildcard may only be the whole leftmost label".to_owned());
            }
            if labels.len() < 3 {
                return Err("a wildcard needs at least two labels above it".to_owned());
            }
            continue;
        }
        check_label(label)?;
    }
    Ok(())
}

/// Checks one LDH label.
fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("it has an empty label".to_owned());
    }
    if label.len() > MAX_DNS_LABEL {
        return Err(format!(
            "a label is {} characters long; at most {MAX_DNS_LABEL} are allowed",
            label.len()
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "it holds {}; labels are letters, digits and hyphens",
            describe_char(c)
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err("a label starts or ends with a hyphen".to_owned());
    }
    Ok(())
}

/// Checks an email address (`local@domain`, see the module documentation).
pub fn check_email(address: &str) -> Result<(), String> {
    if let Some(c) = address.chars().find(|c| !c.is_ascii() || c.is_control()) {
        return Err(format!("it holds {}", describe_char(c)));
    }
    if address.len() > MAX_EMAIL {
        return Err(format!(
            "it is {} characters long; at most {MAX_EMAIL} are allowed",
            address.len()
        ));
    }
    let Some((local, domain)) = address.split_once('@') else {
        return Err("it has no @".to_owned());
    };
    if domain.contains('@') {
        return Err("it has more than one @".to_owned());
    }
    if local.is_empty() || local.len() > MAX_EMAIL_LOCAL {
        return Err(format!(
            "its local part has {} characters; 1 to {MAX_EMAIL_LOCAL} are allowed",
            local.len()
        ));
    }
    const ATEXT_SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~";
    for atom in local.split('.') {
        if atom.is_empty() {
            return Err("its local part has an empty dot-separated part".to_owned());
        }
        if let Some(c) = atom
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || ATEXT_SPECIALS.contains(*c)))
        {
            return Err(format!("its local part holds {}", describe_char(c)));
        }
    }
    check_dns_name(domain, Wildcard::Refused).map_err(|why| format!("its domain: {why}"))
}

/// Checks a URI (see the module documentation).
pub fn check_uri(uri: &str) -> Result<(), String> {
    if let Some(c) = uri.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(format!(
            "it holds {}; non-ASCII characters are percent-encoded",
            describe_char(c)
        ));
    }
    if uri.len() > MAX_URI {
        return Err(format!(
            "it is {} characters long; at most {MAX_URI} are allowed",
            uri.len()
        ));
    }
    const ALLOWED: &str = "-._~:/?#[]@!$&'()*+,;=";
    if let Some(c) = uri
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ALLOWED.contains(*c) || *c == '%'))
    {
        return Err(format!("it holds {}", describe_char(c)));
    }
    let bytes = uri.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Err("a % is not followed by two hex digits".to_owned());
        }
    }
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Err("it has no scheme".to_owned());
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return Err("its scheme is not letters, digits, +, - and . after a letter".to_owned());
    }
    if rest.is_empty() {
        return Err("it has nothing after its scheme".to_owned());
    }
    if let Some(after) = rest.strip_prefix("//") {
        let authority = after.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err("it carries user information (user@host)".to_owned());
        }
        let host = if let Some(bracketed) = authority.strip_prefix('[') {
            let (literal, tail) = bracketed
                .split_once(']')
                .ok_or("its host has an unclosed [")?;
            literal
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| "its host is not an IPv6 address".to_owned())?;
            check_port(tail)?;
            return Ok(());
        } else {
            match authority.split_once(':') {
                Some((host, port)) => {
                    check_port(&format!(":{port}"))?;
                    host
                }
                None => authority,
            }
        };
        if host.parse::<std::net::Ipv4Addr>().is_err() {
            check_dns_name(host, Wildcard::Refused).map_err(|why| format!("its host: {why}"))?;
        }
    }
    Ok(())
}

fn check_port(tail: &str) -> Result<(), String> {
    match tail.strip_prefix(':') {
        None if tail.is_empty() => Ok(()),
        Some(port) if port.parse::<u16>().is_ok() => Ok(()),
        _ => Err("its port is not a number up to 65535".to_owned()),
    }
}

fn no_control_or_format(value: &str) -> Result<(), String> {
    match value.chars().find(|c| is_deceptive(*c)) {
        Some(c) if c.is_control() => Err(format!(
            "contains the control character {}",
            describe_char(c)
        )),
        Some(c) => Err(format!(
            "contains the invisible formatting character {}",
            describe_char(c)
        )),
        None => Ok(()),
    }
}

/// `'x'` for visible ASCII, `U+XXXX` otherwise.
fn describe_char(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("'{c}'")
    } else {
        format!("U+{:04X}", u32::from(c))
    }
}

/// At most [`SHOWN_CHARS`] characters of `text` (already escaped for display), with the
/// length when cut.
fn shown(text: &str) -> String {
    let count = text.chars().count();
    if count <= SHOWN_CHARS {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(SHOWN_CHARS).collect();
    let _ = write!(out, "... ({count} characters)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        let good = [
            "plant.local",
            "gw-1.plant.local",
            "GW1.Plant.Local",
            "localhost",
            "xn--bcher-kva.example",
            "*.plant.local",
            "a.b.c.d.e",
            "0.example",
            &format!("{}.example", "a".repeat(63)),
            &[
                &"a".repeat(63),
                "b".repeat(63).as_str(),
                &"c".repeat(63),
                &"d".repeat(61),
            ]
            .join("."),
        ];
        for name in good {
            assert_eq!(check_dns_name(name, Wildcard::Allowed), Ok(()), "{name}");
        }
        let bad: [(&str, &str); 19] = [
            ("", "empty"),
            ("victim.example\0.plant.local", "U+0000"),
            ("evil.com/.plant.local", "'/'"),
            ("a b.plant.local", "U+0020"),
            ("bücher.example", "non-ASCII character U+00FC"),
            ("host.plant.local.", "ends with a dot"),
            ("a..plant.local", "empty label"),
            (".plant.local", "empty label"),
            ("-gw.plant.local", "hyphen"),
            ("gw-.plant.local", "hyphen"),
            ("under_score.plant.local", "'_'"),
            ("gw.plant.local\r\nX: y", "U+000D"),
            ("gw*.plant.local", "'*'"),
            ("a.*.plant.local", "leftmost"),
            ("*.local", "two labels"),
            ("*", "two labels"),
            ("**.plant.local", "'*'"),
            (&format!("{}.example", "a".repeat(64)), "64 characters"),
            (
                &[
                    &"a".repeat(63),
                    "b".repeat(63).as_str(),
                    &"c".repeat(63),
                    &"d".repeat(62),
                ]
                .join("."),
                "254 characters",
            ),
        ];
        for (name, why) in bad {
            let err = check_dns_name(name, Wildcard::Allowed).unwrap_err();
            assert!(err.contains(why), "{name:?}: {err}");
        }
        assert!(check_dns_name("*.plant.local", Wildcard::Refused)
            .unwrap_err()
            .contains("not allowed"));
    }

    #[test]
    fn emails() {
        for good in [
            "ceo@corp.example",
            "first.last+tag@plant.local",
            "o'brien@x.example",
        ] {
            assert_eq!(check_email(good), Ok(()), "{good}");
        }
        let bad: [(&str, &str); 10] = [
            ("ceo@corp.example\0@plant.local", "U+0000"),
            ("ceo@corp.example@plant.local", "more than one @"),
            ("nobody", "no @"),
            ("@plant.local", "local part"),
            ("a..b@plant.local", "empty dot-separated"),
            (".a@plant.local", "empty dot-separated"),
            ("\"quoted\"@plant.local", "'\"'"),
            ("a@*.plant.local", "wildcard"),
            ("ümlaut@plant.local", "U+00FC"),
            ("a@evil.com/.plant.local", "'/'"),
        ];
        for (address, why) in bad {
            let err = check_email(address).unwrap_err();
            assert!(err.contains(why), "{address:?}: {err}");
        }
        let long_local = format!("{}@x.example", "a".repeat(65));
        assert!(check_email(&long_local).unwrap_err().contains("65"));
    }

    #[test]
    fn uris() {
        for good in [
            "spiffe://plant.local/edge/gw1",
            "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
            "https://10.0.0.1:8443/x?y=%20z#f",
            "https://[fd00::1]/",
            "mailto:a@b.example",
        ] {
            assert_eq!(check_uri(good), Ok(()), "{good}");
        }
        let bad: [(&str, &str); 10] = [
            ("spiffe://plant.local/\0x", "U+0000"),
            ("spiffe://plant.local/a b", "U+0020"),
            ("no-scheme", "no scheme"),
            ("1http://x", "scheme"),
            ("https:", "nothing after"),
            ("https://user:pw@host.example/", "user information"),
            ("https://evil.com\\.plant.local/", "'\\'"),
            ("https://ex%2.example/", "two hex digits"),
            ("https://[fd00::1/", "unclosed"),
            ("https://host.example:99999/", "port"),
        ];
        for (uri, why) in bad {
            let err = check_uri(uri).unwrap_err();
            assert!(err.contains(why), "{uri:?}: {err}");
        }
        assert!(check_uri(&format!("urn:{}", "a".repeat(MAX_URI)))
            .unwrap_err()
            .contains("at most 2048"));
    }

    #[test]
    fn subject_attributes() {
        let cn = AttributeType::CommonName;
        assert_eq!(check_attribute(&cn, "dev-1"), Ok(()));
        assert_eq!(check_attribute(&cn, &"é".repeat(64)), Ok(()));
        assert_eq!(check_attribute(&cn, "aziot-edge CA dev 1"), Ok(()));
        assert!(check_attribute(&cn, &"a".repeat(65))
            .unwrap_err()
            .contains("65 characters"));
        assert!(check_attribute(&cn, &"a".repeat(10_000))
            .unwrap_err()
            .contains("at most 64"));
        for (value, why) in [
            ("dev\r\n1", "control character U+000D"),
            ("dev\n1", "U+000A"),
            ("dev\u{7f}", "U+007F"),
            ("dev\u{85}", "U+0085"),
            ("dev\u{1b}[31m", "U+001B"),
            ("gw\u{202e}1", "invisible formatting character U+202E"),
            ("", "empty"),
        ] {
            let err = check_attribute(&cn, value).unwrap_err();
            assert!(err.contains(why), "{value:?}: {err}");
        }
        let c = AttributeType::Country;
        assert_eq!(check_attribute(&c, "DE"), Ok(()));
        assert!(check_attribute(&c, "DEU").is_err());
        let dc = AttributeType::DomainComponent;
        assert_eq!(check_attribute(&dc, "contoso"), Ok(()));
        assert!(check_attribute(&dc, "con.toso").is_err());
        let email = AttributeType::EmailAddress;
        assert_eq!(check_attribute(&email, "a@b.example"), Ok(()));
        assert!(check_attribute(&email, "a@b\0.example").is_err());
        let other = AttributeType::Other("2.5.4.42".to_owned());
        assert_eq!(check_attribute(&other, &"x".repeat(256)), Ok(()));
        assert!(check_attribute(&other, &"x".repeat(257)).is_err());
    }

    #[test]
    fn refusals_name_the_name_escaped_and_cut() {
        let subject =
            Subject::from_attributes(vec![(AttributeType::CommonName, "x".repeat(10_000))]);
        let err = check_requested_names(&subject, &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("subject attribute CN=\"xxx"), "{err}");
        assert!(err.contains("(10002 characters)"), "{err}");
        assert!(err.len() < 250, "{err}");
        let subject = Subject::from_attributes(vec![(
            AttributeType::CommonName,
            "ok\r\ninjected".to_owned(),
        )]);
        let err = check_requested_names(&subject, &[])
            .unwrap_err()
            .to_string();
        assert!(!err.contains('\n') && !err.contains('\r'), "{err}");
        assert!(err.contains(r#"CN="ok\r\ninjected""#), "{err}");
        let ok = Subject::from_attributes(vec![(AttributeType::CommonName, "dev1".to_owned())]);
        let err = check_requested_names(
            &ok,
            &[SanEntry::Dns("victim.example\0.plant.local".to_owned())],
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "subjectAltName DNS:victim.example\\u{0}.plant.local is not a DNS name: it holds U+0000; \
             labels are letters, digits and hyphens"
        );
        assert_eq!(
            check_requested_names(
                &ok,
                &[
                    SanEntry::Dns("dev1.plant.local".to_owned()),
                    SanEntry::Email("dev1@plant.local".to_owned()),
                    SanEntry::Uri("spiffe://plant.local/dev1".to_owned()),
                    SanEntry::Ip("10.0.0.1".parse().unwrap()),
                ]
            ),
            Ok(())
        );
    }
}
