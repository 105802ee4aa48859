//! Base64 bodies of EST messages (RFC 7030 section 4, RFC 8951).
//!
//! Reading is liberal: clients wrap base64 at any width with LF or CRLF, or not at all, omit
//! padding, send PEM armour, or even raw DER (field notes, item 1). Writing is strict: padded
//! standard base64 in 64-column lines, since some OpenSSL-BIO clients fail on one long line.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::{DecodeError, Engine};

use super::ProtocolError;

/// Standard alphabet, padding optional, non-zero trailing bits tolerated.
const LIBERAL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Line width of the base64 we send (the PEM width, RFC 7468).
const LINE_WIDTH: usize = 64;

/// Decodes a PKCS#10 request body into DER (the caller parses it).
///
/// Accepted: base64 with any ASCII whitespace anywhere, padded or not; PEM armour with any label
/// (`CERTIFICATE REQUEST`, `NEW CERTIFICATE REQUEST`, ...), with text around it; base64 of such a
/// PEM text; raw DER, recognised as a SEQUENCE whose DER length spans exactly the whole body (a
/// base64 body cannot look like that: its first character would be `0`, and base64 of a SEQUENCE
/// starts with `M`).
pub fn decode_request_body(body: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    if body.first() == Some(&0x30) && der_tlv_len(body) == Some(body.len()) {
        return Ok(body.to_vec());
    }
    decode_text(body, true)
}

/// Decodes a base64 answer read from an upstream EST server (e.g. a PKCS#7 certs-only message):
/// base64 with any whitespace, or PEM armour (`PKCS7` or any other label). Raw DER is not
/// recognised here: RFC 7030 answers are base64.
pub fn decode_base64_body(body: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    decode_text(body, true)
}

/// Standard base64 with padding, in 64-column lines each ending in `\n` (the last one too).
/// Empty input gives an empty string.
pub fn encode_base64_lines(der: &[u8]) -> String {
    encode_base64_wrapped(der, "\n")
}

/// Like [`encode_base64_lines`] with a chosen line ending (MIME parts use CRLF).
pub(crate) fn encode_base64_wrapped(der: &[u8], line_end: &str) -> String {
    let text = STANDARD.encode(der);
    let lines = text.len().div_ceil(LINE_WIDTH);
    let mut out = String::with_capacity(text.len() + lines * line_end.len());
    for (i, c) in text.chars().enumerate() {
        if i > 0 && i % LINE_WIDTH == 0 {
            out.push_str(line_end);
        }
        out.push(c);
    }
    if !text.is_empty() {
        out.push_str(line_end);
    }
    out
}

/// The total length (header and contents) of the DER/BER TLV starting at `bytes[0]`, if its
/// header is well-formed with a definite length of at most four octets. Nothing is checked
/// beyond the header, and the TLV may be longer than `bytes`.
pub(crate) fn der_tlv_len(bytes: &[u8]) -> Option<usize> {
    let tag = *bytes.first()?;
    if tag & 0x1f == 0x1f {
        // High tag numbers do not occur in the structures we sniff.
        return None;
    }
    let first = *bytes.get(1)?;
    let (header, len) = match first {
        0..=0x7f => (2, usize::from(first)),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let octets = bytes.get(2..2 + n)?;
            let len = octets
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (2 + n, len)
        }
        _ => return None,
    };
    header.checked_add(len)
}

/// Base64 or PEM text to bytes; `unwrap_pem_in_base64` allows one level of base64-encoded PEM.
fn decode_text(body: &[u8], unwrap_pem_in_base64: bool) -> Result<Vec<u8>, ProtocolError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ProtocolError::EmptyBody);
    }
    let (start, payload) = match pem_payload(body)? {
        Some(found) => found,
        None => (0, body),
    };
    let compact: Vec<u8> = payload
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let decoded = LIBERAL
        .decode(&compact)
        .map_err(|e| ProtocolError::Base64(describe(&e, payload, start)))?;
    if decoded.is_empty() {
        return Err(ProtocolError::EmptyBody);
    }
    if unwrap_pem_in_base64 && decoded.starts_with(b"-----BEGIN") {
        return decode_text(&decoded, false);
    }
    Ok(decoded)
}

/// Finds PEM armour (RFC 7468) anywhere in the body and returns the offset and bytes of the
/// base64 between the BEGIN and END lines; text outside the armour is ignored.
fn pem_payload(body: &[u8]) -> Result<Option<(usize, &[u8])>, ProtocolError> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    const DASHES: &[u8] = b"-----";
    let Some(begin) = find(body, BEGIN, 0) else {
        return Ok(None);
    };
    let label_start = begin + BEGIN.len();
    let label_end = find(body, DASHES, label_start)
        .filter(|&end| {
            body.get(label_start..end)
                .is_some_and(|l| !l.contains(&b'\n'))
        })
        .ok_or_else(|| {
            ProtocolError::Base64("the PEM BEGIN line is not closed by \"-----\"".into())
        })?;
    let start = label_end + DASHES.len();
    let end = find(body, END, start)
        .ok_or_else(|| ProtocolError::Base64("PEM armour without an END line".into()))?;
    Ok(body.get(start..end).map(|payload| (start, payload)))
}

/// Position of `needle` in `haystack` at or after `from`.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// A message about a base64 error, pointing at the offending byte's offset in the body and
/// repeating at most that one byte.
fn describe(err: &DecodeError, payload: &[u8], start: usize) -> String {
    // Offsets from the decoder count only non-whitespace bytes; map back to the body.
    let body_offset = |index: usize| {
        payload
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.is_ascii_whitespace())
            .nth(index)
            .map_or(start + payload.len(), |(i, _)| start + i)
    };
    let shown = |b: u8| {
        if b.is_ascii_graphic() {
            format!("'{}'", char::from(b))
        } else {
            format!("byte 0x{b:02x}")
        }
    };
    match *err {
        DecodeError::InvalidByte(index, b) => {
            format!(
                "invalid character {} at offset {}",
                shown(b),
                body_offset(index)
            )
        }
        DecodeError::InvalidLastSymbol(index, b) => {
            format!(
                "invalid last symbol {} at offset {}",
                shown(b),
                body_offset(index)
            )
        }
        DecodeError::InvalidLength(symbols) => {
            format!("truncated: {symbols} base64 characters cannot encode whole bytes")
        }
        DecodeError::InvalidPadding => "invalid padding".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_der() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["device-01".to_owned()]).expect("params");
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    fn wrap(text: &str, width: usize, eol: &str) -> String {
        text.as_bytes()
            .chunks(width)
            .map(|c| format!("{}{eol}", String::from_utf8_lossy(c)))
            .collect()
    }

    #[test]
    fn accepts_all_the_shapes_clients_send() {
        let der = csr_der();
        let b64 = STANDARD.encode(&der);
        let unpadded = b64.trim_end_matches('=').to_owned();
        let pem_body = wrap(&b64, 64, "\n");
        let shapes = vec![
            b64.clone(),
            unpadded.clone(),
            wrap(&b64, 64, "\n"),
            wrap(&b64, 64, "\r\n"),
            wrap(&b64, 76, "\r\n"),
            wrap(&unpadded, 64, "\n"),
            wrap(&b64, 1, " \t"),
            format!("\r\n  {b64}\n\n"),
            format!("-----BEGIN CERTIFICATE REQUEST-----\n{pem_body}-----END CERTIFICATE REQUEST-----\n"),
            format!("\n\n-----BEGIN NEW CERTIFICATE REQUEST-----\r\n{}-----END NEW CERTIFICATE REQUEST-----\r\n\r\n", wrap(&b64, 64, "\r\n")),
            format!("Subject: x\n-----BEGIN WHATEVER-----\n{b64}\n-----END WHATEVER-----"),
            format!("-----BEGIN CERTIFICATE REQUEST-----{b64}-----END CERTIFICATE REQUEST-----"),
            // base64 of a PEM text
            STANDARD.encode(format!(
                "-----BEGIN CERTIFICATE REQUEST-----\n{pem_body}-----END CERTIFICATE REQUEST-----\n"
            )),
        ];
        for shape in shapes {
            assert_eq!(
                decode_request_body(shape.as_bytes()).as_ref(),
                Ok(&der),
                "{shape:?}"
            );
        }
        assert_eq!(decode_request_body(&der), Ok(der.clone()));
    }

    #[test]
    fn raw_der_needs_exact_length() {
        let der = csr_der();
        let mut longer = der.clone();
        longer.push(0);
        // Not DER (trailing byte) and not base64 either.
        assert!(matches!(
            decode_request_body(&longer),
            Err(ProtocolError::Base64(_))
        ));
        let shorter = der.get(..der.len() - 1).unwrap_or_default();
        assert!(matches!(
            decode_request_body(shorter),
            Err(ProtocolError::Base64(_))
        ));
        // Short-form lengths too.
        assert_eq!(decode_request_body(&[0x30, 0x00]), Ok(vec![0x30, 0x00]));
        assert_eq!(
            decode_request_body(&[0x30, 0x03, 0x02, 0x01, 0x05]),
            Ok(vec![0x30, 0x03, 0x02, 0x01, 0x05])
        );
    }

    #[test]
    fn empty_bodies() {
        for body in [
            &b""[..],
            b" ",
            b"\r\n\t \n",
            b"====",
            b"-----BEGIN X-----\n\n-----END X-----\n",
        ] {
            let got = decode_request_body(body);
            assert!(
                got == Err(ProtocolError::EmptyBody)
                    || matches!(got, Err(ProtocolError::Base64(_))),
                "{body:?}: {got:?}"
            );
        }
        assert_eq!(decode_request_body(b""), Err(ProtocolError::EmptyBody));
        assert_eq!(decode_request_body(b" \r\n"), Err(ProtocolError::EmptyBody));
        assert_eq!(
            decode_request_body(b"-----BEGIN X-----\n\n-----END X-----\n"),
            Err(ProtocolError::EmptyBody)
        );
    }

    #[test]
    fn bad_base64_is_reported_with_body_offset_and_little_echo() {
        let err = decode_request_body(b"MIIB\nAA%A\n");
        assert_eq!(
            err,
            Err(ProtocolError::Base64(
                "invalid character '%' at offset 7".to_owned()
            ))
        );
        let err = decode_request_body(b"  MIIB\xffAAAA");
        assert_eq!(
            err,
            Err(ProtocolError::Base64(
                "invalid character byte 0xff at offset 6".to_owned()
            ))
        );
        let secret = "password=hunter2hunter2hunter2";
        let Err(ProtocolError::Base64(msg)) = decode_request_body(secret.as_bytes()) else {
            panic!("should fail");
        };
        assert!(!msg.contains("hunter2"), "{msg}");
        assert!(msg.len() < 80, "{msg}");
        assert!(matches!(
            decode_request_body(b"MIIBA"),
            Err(ProtocolError::Base64(m)) if m.starts_with("truncated")
        ));
        assert!(matches!(
            decode_request_body(b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n"),
            Err(ProtocolError::Base64(m)) if m.contains("END")
        ));
        assert!(matches!(
            decode_request_body(b"-----BEGIN CERTIFICATE REQUEST\nMIIB\n-----END X-----"),
            Err(ProtocolError::Base64(_))
        ));
        // Offsets inside PEM armour are offsets in the body.
        let body = b"-----BEGIN X-----\nAB*D\n-----END X-----\n";
        assert_eq!(
            decode_request_body(body),
            Err(ProtocolError::Base64(
                "invalid character '*' at offset 20".to_owned()
            ))
        );
    }

    #[test]
    fn no_panics_on_odd_input() {
        let samples: Vec<Vec<u8>> = vec![
            vec![0x30],
            vec![0x30, 0x80],
            vec![0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            vec![0x30, 0x88, 1, 2, 3, 4, 5, 6, 7, 8],
            vec![0x30, 0x81],
            vec![0x1f, 0x30],
            b"-----BEGIN ".to_vec(),
            b"-----BEGIN -----".to_vec(),
            b"-----BEGIN -----END -----".to_vec(),
            b"-----END X----- -----BEGIN X-----".to_vec(),
            "\u{e9}\u{1F600}".as_bytes().to_vec(),
            vec![0u8; 1000],
            (0..=255u8).collect(),
            STANDARD.encode("-----BEGIN X-----").into_bytes(),
            STANDARD
                .encode(STANDARD.encode("-----BEGIN X-----\nAAAA\n-----END X-----"))
                .into_bytes(),
        ];
        for s in samples {
            let _ = decode_request_body(&s);
            let _ = decode_base64_body(&s);
        }
    }

    #[test]
    fn upstream_answers() {
        let der = csr_der();
        let b64 = encode_base64_lines(&der);
        assert_eq!(decode_base64_body(b64.as_bytes()), Ok(der.clone()));
        let pem = format!("-----BEGIN PKCS7-----\n{b64}-----END PKCS7-----\n");
        assert_eq!(decode_base64_body(pem.as_bytes()), Ok(der.clone()));
        // Raw DER is not base64.
        assert!(decode_base64_body(&der).is_err());
    }

    #[test]
    fn encodes_64_column_lines() {
        assert_eq!(encode_base64_lines(b""), "");
        assert_eq!(encode_base64_lines(b"a"), "YQ==\n");
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = encode_base64_lines(&data);
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        let (last, full) = lines.split_last().unwrap_or((&"", &[]));
        assert!(full.iter().all(|l| l.len() == 64));
        assert!(!last.is_empty() && last.len() <= 64);
        assert!(!text.contains('\r'));
        assert_eq!(decode_base64_body(text.as_bytes()), Ok(data.clone()));
        // Exactly one full line.
        assert_eq!(encode_base64_lines(&[0u8; 48]).matches('\n').count(), 1);
        assert_eq!(encode_base64_lines(&[0u8; 49]).matches('\n').count(), 2);
        let crlf = encode_base64_wrapped(&data, "\r\n");
        assert_eq!(crlf, text.replace('\n', "\r\n"));
    }

    #[test]
    fn tlv_len() {
        assert_eq!(der_tlv_len(&[0x30, 0x00]), Some(2));
        assert_eq!(der_tlv_len(&[0x30, 0x7f]), Some(0x81));
        assert_eq!(der_tlv_len(&[0x30, 0x81, 0x80]), Some(0x83));
        assert_eq!(der_tlv_len(&[0x30, 0x82, 0x01, 0x00]), Some(0x104));
        assert_eq!(
            der_tlv_len(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            6usize.checked_add(0xffff_ffff)
        );
        assert_eq!(der_tlv_len(&[0x30, 0x80]), None);
        assert_eq!(der_tlv_len(&[0x30, 0x85, 0, 0, 0, 0, 1]), None);
        assert_eq!(der_tlv_len(&[0x30, 0x82, 0x01]), None);
        assert_eq!(der_tlv_len(&[0x30]), None);
        assert_eq!(der_tlv_len(&[]), None);
    }
}
