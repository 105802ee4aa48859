//! RFC 7512 `pkcs11:` URIs, as IoT Edge writes them
//! (`pkcs11:slot-id=0;object=est-id?pin-value=1234`).
//!
//! A URI may carry its PIN (`pin-value`), so it is never shown as written: [`redact`] is what
//! errors and logs print.

use std::path::PathBuf;

use percent_encoding::percent_decode_str;
use secrecy::SecretString;

/// Where a token's PIN comes from.
pub enum PinSource {
    /// `pin-value=`: in the URI itself (allowed in a local file, refused in the module twin).
    Value(SecretString),
    /// `pin-source=file:/path` (or a bare path): the first line of that file.
    File(PathBuf),
}

/// A parsed `pkcs11:` URI naming one private key.
pub struct Pkcs11Uri {
    /// The URI with its PIN redacted, for messages.
    pub shown: String,
    pub token: Option<String>,
    pub serial: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    /// CKA_LABEL.
    pub object: Option<String>,
    /// CKA_ID.
    pub id: Option<Vec<u8>>,
    pub pin: Option<PinSource>,
    /// `module-path=`: the PKCS#11 library, overriding the configured `pkcs11_module`.
    pub module_path: Option<PathBuf>,
}

/// Whether a configured key names a token key rather than a file.
pub fn is_pkcs11(text: &str) -> bool {
    text.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("pkcs11:"))
}

/// `text` with the value of every `pin-value` attribute replaced: safe to print. Anything that
/// is not a `pkcs11:` URI is returned unchanged.
pub fn redact(text: &str) -> String {
    if !is_pkcs11(text) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..7]);
    let mut rest = &text[7..];
    // Attributes are separated by ';' (path) and '&' (query), the query starts at '?'.
    while !rest.is_empty() {
        let end = rest.find([';', '&', '?']).unwrap_or(rest.len());
        let (part, tail) = rest.split_at(end);
        match part.split_once('=') {
            Some((name, _)) if name.trim().eq_ignore_ascii_case("pin-value") => {
                out.push_str(name);
                out.push_str("=(redacted)");
            }
            _ => out.push_str(part),
        }
        if let Some(sep) = tail.chars().next() {
            out.push(sep);
            rest = &tail[1..];
        } else {
            rest = "";
        }
    }
    out
}

impl Pkcs11Uri {
    pub fn parse(text: &str) -> Result<Pkcs11Uri, String> {
        let shown = redact(text);
        if !is_pkcs11(text) {
            return Err(format!("{shown}: not a pkcs11: URI"));
        }
        let body = &text[7..];
        let (path, query) = body.split_once('?').unwrap_or((body, ""));
        let mut uri = Pkcs11Uri {
            shown: shown.clone(),
            token: None,
            serial: None,
            manufacturer: None,
            model: None,
            slot_id: None,
            object: None,
            id: None,
            pin: None,
            module_path: None,
        };
        let bad = |what: String| format!("{shown}: {what}");
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr.split_once('=').ok_or_else(|| {
                bad(format!(
                    "path attribute {:?} has no value",
                    redact_attr(attr)
                ))
            })?;
            let decoded = || decode(value).map_err(|e| bad(format!("{name}: {e}")));
            let text_value = || {
                decoded().and_then(|v| {
                    String::from_utf8(v).map_err(|_| bad(format!("{name}: not UTF-8")))
                })
            };
            match name {
                "token" => set(&mut uri.token, text_value()?, name, &shown)?,
                "serial" => set(&mut uri.serial, text_value()?, name, &shown)?,
                "manufacturer" => set(&mut uri.manufacturer, text_value()?, name, &shown)?,
                "model" => set(&mut uri.model, text_value()?, name, &shown)?,
                "object" => set(&mut uri.object, text_value()?, name, &shown)?,
                "id" => set(&mut uri.id, decoded()?, name, &shown)?,
                "slot-id" => {
                    let id = text_value()?
                        .parse::<u64>()
                        .map_err(|_| bad("slot-id: not a decimal number".into()))?;
                    set(&mut uri.slot_id, id, name, &shown)?
                }
                "type" => {
                    if text_value()? != "private" {
                        return Err(bad(
                            "type: only private keys can be used (type=private)".into()
                        ));
                    }
                }
                // Attributes that select nothing a signing key needs (library-*, slot-*),
                // accepted as RFC 7512 requires of unknown attributes... except that an
                // unknown attribute could be a typo that silently widens the match.
                "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-description"
                | "slot-manufacturer" => {}
                "pin-value" | "pin-source" | "module-path" | "module-name" => {
                    return Err(bad(format!("{name} belongs in the query (after '?')")))
                }
                other => return Err(bad(format!("unknown path attribute {other:?}"))),
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr.split_once('=').ok_or_else(|| {
                bad(format!(
                    "query attribute {:?} has no value",
                    redact_attr(attr)
                ))
            })?;
            let text_value = || {
                decode(value)
                    .ok()
                    .and_then(|v| String::from_utf8(v).ok())
                    .ok_or_else(|| bad(format!("{name}: not UTF-8 after percent-decoding")))
            };
            match name {
                "pin-value" => {
                    if uri.pin.is_some() {
                        return Err(bad("more than one PIN (pin-value/pin-source)".into()));
                    }
                    uri.pin = Some(PinSource::Value(SecretString::from(text_value()?)));
                }
                "pin-source" => {
                    if uri.pin.is_some() {
                        return Err(bad("more than one PIN (pin-value/pin-source)".into()));
                    }
                    let source = text_value()?;
                    let path = source.strip_prefix("file:").unwrap_or(&source);
                    // file:///path and file:/path both name /path.
                    let path = path.strip_prefix("//").unwrap_or(path);
                    if path.is_empty() {
                        return Err(bad("pin-source: names no file".into()));
                    }
                    uri.pin = Some(PinSource::File(PathBuf::from(path)));
                }
                "module-path" => set(
                    &mut uri.module_path,
                    PathBuf::from(text_value()?),
                    name,
                    &shown,
                )?,
                other => return Err(bad(format!("unknown query attribute {other:?}"))),
            }
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err(bad("names no key: give object= (its label) or id=".into()));
        }
        Ok(uri)
    }
}

fn redact_attr(attr: &str) -> String {
    redact(&format!("pkcs11:{attr}"))[7..].to_owned()
}

fn set<T>(slot: &mut Option<T>, value: T, name: &str, shown: &str) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{shown}: {name} given twice"));
    }
    *slot = Some(value);
    Ok(())
}

fn decode(value: &str) -> Result<Vec<u8>, String> {
    // percent_decode_str passes malformed escapes through; refuse them instead.
    let bytes = value.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit())
        {
            return Err("malformed percent-encoding".into());
        }
    }
    Ok(percent_decode_str(value).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn iot_edge_form_parses_and_redacts() {
        let uri = Pkcs11Uri::parse("pkcs11:slot-id=0;object=est-id?pin-value=1234").unwrap();
        assert_eq!(uri.slot_id, Some(0));
        assert_eq!(uri.object.as_deref(), Some("est-id"));
        match uri.pin {
            Some(PinSource::Value(pin)) => assert_eq!(pin.expose_secret(), "1234"),
            _ => panic!("pin-value not read"),
        }
        assert_eq!(
            uri.shown,
            "pkcs11:slot-id=0;object=est-id?pin-value=(redacted)"
        );
        assert!(!uri.shown.contains("1234"));
    }

    #[test]
    fn all_attributes() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=Plant%20HSM;serial=abc;id=%01%02;type=private\
             ?pin-source=file:/run/pin&module-path=/usr/lib/softhsm/libsofthsm2.so",
        )
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("Plant HSM"));
        assert_eq!(uri.serial.as_deref(), Some("abc"));
        assert_eq!(uri.id.as_deref(), Some(&[1u8, 2][..]));
        assert!(matches!(uri.pin, Some(PinSource::File(ref p)) if p == &PathBuf::from("/run/pin")));
        assert_eq!(
            uri.module_path,
            Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
        );
    }

    #[test]
    fn refusals_never_show_the_pin() {
        for (text, expect) in [
            ("pkcs11:token=a?pin-value=s3cret", "names no key"),
            (
                "pkcs11:token=a;object=k;bogus=1?pin-value=s3cret",
                "unknown path attribute",
            ),
            ("pkcs11:object=k;pin-value=s3cret", "belongs in the query"),
            (
                "pkcs11:object=k?pin-value=s3cret&pin-value=s3cret",
                "more than one PIN",
            ),
            ("pkcs11:object=k;slot-id=x?pin-value=s3cret", "slot-id"),
            (
                "pkcs11:object=k;type=secret-key?pin-value=s3cret",
                "only private keys",
            ),
            ("pkcs11:object=k%zz?pin-value=s3cret", "percent"),
            (
                "pkcs11:object=k?pin-value=s3cret&what=1",
                "unknown query attribute",
            ),
        ] {
            let err = Pkcs11Uri::parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text} parsed"));
            assert!(err.contains(expect), "{text}: {err}");
            assert!(!err.contains("s3cret"), "{text}: the PIN shows in {err}");
        }
        // Positive control: the same shape, well-formed, parses.
        assert!(Pkcs11Uri::parse("pkcs11:token=a;object=k?pin-value=s3cret").is_ok());
    }

    #[test]
    fn redact_handles_every_position() {
        assert_eq!(
            redact("pkcs11:object=k?module-path=/x&pin-value=1&pin-value=2"),
            "pkcs11:object=k?module-path=/x&pin-value=(redacted)&pin-value=(redacted)"
        );
        assert_eq!(
            redact("pkcs11:pin-value=9;object=k"),
            "pkcs11:pin-value=(redacted);object=k"
        );
        assert_eq!(redact("/etc/key.pem"), "/etc/key.pem");
    }
}
