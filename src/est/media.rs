//! Media types of EST messages (RFC 7030 section 3.2.4 and section 4, RFC 8951).
//!
//! We answer with the exact spellings below (some clients compare them byte for byte) and read
//! request types liberally.

/// A PKCS#10 certificate request (`simpleenroll`, `simplereenroll`, `serverkeygen` requests).
pub const PKCS10: &str = "application/pkcs10";
/// CMS, without parameters: the `cacerts` answer (RFC 7030 section 4.1.3).
pub const PKCS7_MIME: &str = "application/pkcs7-mime";
/// CMS certs-only: the enrollment answers (RFC 7030 section 4.2.3).
pub const PKCS7_CERTS_ONLY: &str = "application/pkcs7-mime; smime-type=certs-only";
/// The `csrattrs` answer (RFC 7030 section 4.5.2).
pub const CSRATTRS: &str = "application/csrattrs";
/// The private key part of a `serverkeygen` answer (RFC 7030 section 4.4.2).
pub const PKCS8: &str = "application/pkcs8";
/// Human-readable error answers.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// The `type/subtype` of a media type, lowercased, without parameters or any whitespace.
///
/// `"Application/PKCS10 ; foo=bar"` gives `"application/pkcs10"`.
pub fn essence(content_type: &str) -> String {
    let main = content_type.split(';').next().unwrap_or_default();
    main.chars()
        .filter(|c| !c.is_ascii_whitespace())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether a request's `Content-Type` may carry a PKCS#10 request.
///
/// Liberal on purpose (RFC 8951; clients differ in spelling): case, parameters and whitespace do
/// not matter, the legacy `application/x-pkcs10` is accepted, and so is a missing (or empty)
/// header, since the body decoder recognises the CSR anyway. Any other type is refused so that
/// e.g. a browser form post is not mistaken for an enrollment.
pub fn is_pkcs10(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return true;
    };
    if content_type.trim().is_empty() {
        return true;
    }
    let essence = essence(content_type);
    essence == PKCS10 || essence == "application/x-pkcs10"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn essence_strips_parameters_case_and_whitespace() {
        assert_eq!(essence("application/pkcs10"), "application/pkcs10");
        assert_eq!(essence(" Application/PKCS10 ; a=b"), "application/pkcs10");
        assert_eq!(
            essence("application / pkcs7-mime;smime-type=certs-only"),
            "application/pkcs7-mime"
        );
        assert_eq!(essence(PKCS7_CERTS_ONLY), PKCS7_MIME);
        assert_eq!(essence(""), "");
        assert_eq!(essence(";"), "");
    }

    #[test]
    fn pkcs10_accepted_liberally() {
        for ok in [
            "application/pkcs10",
            "APPLICATION/PKCS10",
            "application/pkcs10; charset=utf-8",
            "  application/pkcs10  ",
            "application/pkcs10;",
            "application/x-pkcs10",
            "Application/X-PKCS10; foo=\"bar\"",
            "",
            "   ",
        ] {
            assert!(is_pkcs10(Some(ok)), "{ok:?} should be accepted");
        }
        assert!(is_pkcs10(None));
    }

    #[test]
    fn other_types_refused() {
        for bad in [
            "application/x-www-form-urlencoded",
            "application/json",
            "text/plain",
            "application/pkcs7-mime",
            "application/pkcs10x",
            "application/pkcs",
            "multipart/form-data; boundary=x",
            "application/pkcs8",
            ";application/pkcs10",
            ";",
        ] {
            assert!(!is_pkcs10(Some(bad)), "{bad:?} should be refused");
        }
    }

    #[test]
    fn constants_are_exact() {
        assert_eq!(PKCS10, "application/pkcs10");
        assert_eq!(PKCS7_MIME, "application/pkcs7-mime");
        assert_eq!(
            PKCS7_CERTS_ONLY,
            "application/pkcs7-mime; smime-type=certs-only"
        );
        assert_eq!(CSRATTRS, "application/csrattrs");
        assert_eq!(PKCS8, "application/pkcs8");
        assert_eq!(TEXT_PLAIN, "text/plain; charset=utf-8");
    }
}
