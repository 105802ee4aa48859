//! What edgeHub authenticates a module by, built exactly as the C# SDK does
//! (`ModuleAuthenticationWithHsm` / `SasTokenBuilder`): the MQTT client id, the MQTT user name
//! and the SAS token. Pure functions; the HMAC itself is computed by the workload API
//! (`workload::WorkloadClient::sign`), which holds the module key.

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The `api-version` edgeHub's MQTT user name parser requires (its value is not checked).
pub const MQTT_API_VERSION: &str = "2020-09-30";

/// `DeviceClientType` sent in the user name.
pub fn product() -> String {
    format!("edge-est/{}", env!("CARGO_PKG_VERSION"))
}

/// .NET `WebUtility.UrlEncode`: everything but ASCII letters, digits and `-_.!*()` is
/// percent-encoded with upper-case hex (`+` → `%2B`, `/` → `%2F`, `=` → `%3D`).
const URL_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'*')
    .remove(b'(')
    .remove(b')');

pub fn url_encode(text: &str) -> String {
    utf8_percent_encode(text, URL_ENCODE).to_string()
}

/// MQTT client id: `{deviceId}/{moduleId}`; edgeHub compares it with the authenticated
/// identity exactly.
pub fn client_id(device_id: &str, module_id: &str) -> String {
    format!("{device_id}/{module_id}")
}

/// MQTT user name: `{host}/{deviceId}/{moduleId}/?api-version=…&DeviceClientType=…`.
pub fn username(host: &str, device_id: &str, module_id: &str, product: &str) -> String {
    format!(
        "{host}/{device_id}/{module_id}/?api-version={MQTT_API_VERSION}&DeviceClientType={}",
        url_encode(product)
    )
}

/// The module-scoped audience `sr`:
/// `UrlEncode(hub + "/devices/" + UrlEncode(device) + "/modules/" + UrlEncode(module))`.
pub fn resource(hub_hostname: &str, device_id: &str, module_id: &str) -> String {
    url_encode(&format!(
        "{hub_hostname}/devices/{}/modules/{}",
        url_encode(device_id),
        url_encode(module_id)
    ))
}

/// What the workload API signs: the verbatim `sr` text, a line feed, the expiry.
pub fn string_to_sign(resource: &str, expiry_unix: u64) -> String {
    format!("{resource}\n{expiry_unix}")
}

/// `SharedAccessSignature sr={sr}&sig={UrlEncode(base64(digest))}&se={expiry}` (no `skn`).
pub fn token(resource: &str, expiry_unix: u64, digest: &[u8]) -> String {
    let sig = url_encode(&base64::engine::general_purpose::STANDARD.encode(digest));
    format!("SharedAccessSignature sr={resource}&sig={sig}&se={expiry_unix}")
}

/// The fields of a SAS token, as edgeHub splits them (for tests and diagnostics).
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedToken {
    pub sr: String,
    pub sig: String,
    pub se: u64,
}

pub fn parse_token(token: &str) -> Option<ParsedToken> {
    let mut parts = token.split_whitespace();
    if parts.next()? != "SharedAccessSignature" {
        return None;
    }
    let fields = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let (mut sr, mut sig, mut se) = (None, None, None);
    for field in fields.split('&') {
        let (name, value) = field.split_once('=')?;
        match name {
            "sr" => sr = Some(value.to_owned()),
            "sig" => sig = Some(value.to_owned()),
            "se" => se = value.parse().ok(),
            _ => {}
        }
    }
    Some(ParsedToken {
        sr: sr?,
        sig: sig?,
        se: se?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::hmac;

    #[test]
    fn encoding_is_webutility_urlencode() {
        assert_eq!(url_encode("a+b/c=d"), "a%2Bb%2Fc%3Dd");
        assert_eq!(url_encode("A-z_0.9!*()"), "A-z_0.9!*()");
        assert_eq!(url_encode("$edgeHub"), "%24edgeHub");
        assert_eq!(url_encode("é"), "%C3%A9");
    }

    #[test]
    fn resource_is_module_scoped_and_encoded_twice_inside() {
        assert_eq!(
            resource("myhub.azure-devices.net", "gw1", "estproxy"),
            "myhub.azure-devices.net%2Fdevices%2Fgw1%2Fmodules%2Festproxy"
        );
        // Device and module ids are encoded before the whole is encoded again (C# SDK).
        assert_eq!(
            resource("h", "gw#1", "m$x"),
            "h%2Fdevices%2Fgw%25231%2Fmodules%2Fm%2524x"
        );
    }

    #[test]
    fn client_id_and_username() {
        assert_eq!(client_id("gw1", "estproxy"), "gw1/estproxy");
        assert_eq!(
            username("gw1.contoso.local", "gw1", "estproxy", "edge-est/0.1.0"),
            "gw1.contoso.local/gw1/estproxy/?api-version=2020-09-30&DeviceClientType=edge-est%2F0.1.0"
        );
    }

    #[test]
    fn token_signature_verifies_over_the_verbatim_resource() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"module primary key");
        let sr = resource("myhub.azure-devices.net", "gw1", "estproxy");
        let se = 1_900_000_000;
        let to_sign = string_to_sign(&sr, se);
        assert_eq!(
            to_sign,
            "myhub.azure-devices.net%2Fdevices%2Fgw1%2Fmodules%2Festproxy\n1900000000"
        );
        let digest = hmac::sign(&key, to_sign.as_bytes());
        let token = token(&sr, se, digest.as_ref());
        assert!(token.starts_with(
            "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fgw1%2Fmodules%2Festproxy&sig="
        ));
        assert!(token.ends_with("&se=1900000000"));
        // edgeHub's way: split on whitespace and '=', decode sig, recompute over sr "\n" se.
        let parsed = parse_token(&token).unwrap();
        assert!(!parsed.sig.contains(['+', '/', '=']), "sig must be encoded");
        let sig = percent_encoding::percent_decode_str(&parsed.sig)
            .decode_utf8()
            .unwrap();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig.as_bytes())
            .unwrap();
        hmac::verify(&key, string_to_sign(&parsed.sr, parsed.se).as_bytes(), &sig)
            .expect("signature verifies");
        assert_eq!(parsed.se, se);
    }
}
