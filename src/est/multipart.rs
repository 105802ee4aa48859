//! The `serverkeygen` answer (RFC 7030 section 4.4.2): a `multipart/mixed` body (RFC 2046) with
//! the private key (`application/pkcs8`) and then the certificate (certs-only PKCS#7), both base64.

use super::body::encode_base64_wrapped;
use super::media;

/// A complete HTTP answer body with the `Content-Type` header value it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartBody {
    pub content_type: String,
    pub body: Vec<u8>,
}

/// MIME line ending (RFC 2046 section 5.1.1).
const CRLF: &str = "\r\n";

/// Builds the `multipart/mixed` answer from the key's PKCS#8 DER and the certs-only PKCS#7 DER.
///
/// The boundary contains `-` and `_`, which the standard base64 alphabet lacks, so it cannot
/// occur in the base64 parts; its random suffix only makes it unique across answers. The base64
/// lines end in CRLF like the rest of the MIME structure; `Content-Transfer-Encoding: base64` is
/// sent for RFC 7030 clients although RFC 8951 readers must not need it.
pub fn serverkeygen_answer(pkcs8_der: &[u8], pkcs7_der: &[u8]) -> MultipartBody {
    let boundary = boundary();
    let mut body = String::new();
    for (content_type, der) in [
        (media::PKCS8, pkcs8_der),
        (media::PKCS7_CERTS_ONLY, pkcs7_der),
    ] {
        body.push_str("--");
        body.push_str(&boundary);
        body.push_str(CRLF);
        body.push_str("Content-Type: ");
        body.push_str(content_type);
        body.push_str(CRLF);
        body.push_str("Content-Transfer-Encoding: base64");
        body.push_str(CRLF);
        body.push_str(CRLF);
        // The CRLF that precedes the next delimiter belongs to the delimiter (RFC 2046), so the
        // last base64 line is terminated by it rather than by a line ending of its own.
        let encoded = encode_base64_wrapped(der, CRLF);
        body.push_str(encoded.strip_suffix(CRLF).unwrap_or(&encoded));
        body.push_str(CRLF);
    }
    body.push_str("--");
    body.push_str(&boundary);
    body.push_str("--");
    body.push_str(CRLF);
    MultipartBody {
        content_type: format!("multipart/mixed; boundary={boundary}"),
        body: body.into_bytes(),
    }
}

/// `est-boundary_` and 32 random hex digits; if the system RNG fails, a fixed suffix, which is
/// still safe because the base64 parts can never contain the prefix.
fn boundary() -> String {
    let mut random = [0u8; 16];
    let suffix = match aws_lc_rs::rand::fill(&mut random) {
        Ok(()) => random.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => "0".repeat(32),
    };
    format!("est-boundary_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::est::body::decode_base64_body;

    /// One parsed part: its headers (name, value) and its content.
    type Part = (Vec<(String, String)>, String);

    /// A test-only, strict multipart/mixed reader.
    fn parse(content_type: &str, body: &[u8]) -> Result<Vec<Part>, String> {
        let (essence, params) = content_type.split_once(';').ok_or("no parameters")?;
        if essence.trim() != "multipart/mixed" {
            return Err(format!("type {essence}"));
        }
        let boundary = params
            .trim()
            .strip_prefix("boundary=")
            .ok_or("no boundary parameter")?;
        let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
        let first = format!("--{boundary}\r\n");
        let delimiter = format!("\r\n--{boundary}");
        let rest = text
            .strip_prefix(&first)
            .ok_or("does not start with the boundary")?;
        let (parts, after) = rest
            .split_once(&format!("{delimiter}--\r\n"))
            .ok_or("no close delimiter")?;
        if !after.is_empty() {
            return Err("data after the close delimiter".into());
        }
        parts
            .split(&format!("{delimiter}\r\n"))
            .map(|part| {
                let (head, content) = part.split_once("\r\n\r\n").ok_or("no header end")?;
                let headers = head
                    .split("\r\n")
                    .map(|h| {
                        h.split_once(": ")
                            .map(|(n, v)| (n.to_owned(), v.to_owned()))
                            .ok_or_else(|| format!("bad header {h:?}"))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok((headers, content.to_owned()))
            })
            .collect()
    }

    fn sample(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn parts_parse_back() {
        let key = sample(138, 1);
        let p7 = sample(1500, 2);
        let answer = serverkeygen_answer(&key, &p7);
        let parts = parse(&answer.content_type, &answer.body).expect("parse");
        assert_eq!(parts.len(), 2);

        let header = |i: usize, name: &str| {
            parts[i]
                .0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header(0, "Content-Type").as_deref(),
            Some("application/pkcs8")
        );
        assert_eq!(
            header(0, "Content-Transfer-Encoding").as_deref(),
            Some("base64")
        );
        assert_eq!(
            header(1, "Content-Type").as_deref(),
            Some("application/pkcs7-mime; smime-type=certs-only")
        );
        assert_eq!(
            header(1, "Content-Transfer-Encoding").as_deref(),
            Some("base64")
        );

        assert_eq!(decode_base64_body(parts[0].1.as_bytes()), Ok(key));
        assert_eq!(decode_base64_body(parts[1].1.as_bytes()), Ok(p7));
        for (_, content) in &parts {
            assert!(content
                .split("\r\n")
                .all(|l| !l.is_empty() && l.len() <= 64));
            assert!(!content.replace("\r\n", "").contains('\n'));
        }
    }

    #[test]
    fn boundary_is_safe_and_unique() {
        let a = serverkeygen_answer(b"k", b"p");
        let b = serverkeygen_answer(b"k", b"p");
        assert_ne!(a.content_type, b.content_type);
        let boundary = a
            .content_type
            .strip_prefix("multipart/mixed; boundary=")
            .expect("prefix");
        assert!(boundary.starts_with("est-boundary_"));
        assert_eq!(boundary.len(), "est-boundary_".len() + 32);
        assert!(boundary.bytes().any(|c| c == b'-' || c == b'_'));
        // RFC 2046 bchars, at most 70 characters, no quoting needed.
        assert!(boundary.len() <= 70);
        assert!(boundary
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        let text = String::from_utf8(a.body).expect("utf8");
        assert!(text.ends_with(&format!("\r\n--{boundary}--\r\n")));
        assert_eq!(text.matches(boundary).count(), 3);
    }

    #[test]
    fn empty_parts_still_parse() {
        let answer = serverkeygen_answer(b"", b"");
        let parts = parse(&answer.content_type, &answer.body).expect("parse");
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|(_, content)| content.is_empty()));
    }

    #[test]
    fn real_key_and_certificate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["device-01".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let p7 = crate::est::pkcs7::encode_certs_only(&[cert.der()]).expect("p7");
        let pkcs8 = key.serialize_der();
        let answer = serverkeygen_answer(&pkcs8, &p7);
        let parts = parse(&answer.content_type, &answer.body).expect("parse");
        let got_key = decode_base64_body(parts[0].1.as_bytes()).expect("key");
        assert_eq!(got_key, pkcs8);
        assert!(rcgen::KeyPair::try_from(got_key.as_slice()).is_ok());
        let got_p7 = decode_base64_body(parts[1].1.as_bytes()).expect("p7");
        assert_eq!(
            crate::est::pkcs7::decode_certs_only(&got_p7),
            Ok(vec![cert.der().to_vec()])
        );
    }
}
