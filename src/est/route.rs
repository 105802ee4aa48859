//! Routing of EST request paths: `/.well-known/est/[<label>/]<operation>` (RFC 7030 3.2.2).

use std::fmt;

/// The path prefix every EST request starts with.
pub const WELL_KNOWN_PREFIX: &str = "/.well-known/est/";

/// Longest label we accept; RFC 7030 sets no limit, but labels name configured CAs, and a bound
/// keeps hostile paths out of logs and metrics.
pub const MAX_LABEL_LEN: usize = 64;

/// How much of a hostile path segment an error message may repeat.
const MAX_ECHO_CHARS: usize = 64;

/// The EST operations this server knows (RFC 7030 section 3.2.2; `fullcmc` is not offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    CaCerts,
    SimpleEnroll,
    SimpleReenroll,
    CsrAttrs,
    ServerKeygen,
}

impl Operation {
    /// Every operation, in RFC order.
    pub const ALL: [Operation; 5] = [
        Operation::CaCerts,
        Operation::SimpleEnroll,
        Operation::SimpleReenroll,
        Operation::CsrAttrs,
        Operation::ServerKeygen,
    ];

    /// The operation's path segment, e.g. `"simpleenroll"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::CaCerts => "cacerts",
            Operation::SimpleEnroll => "simpleenroll",
            Operation::SimpleReenroll => "simplereenroll",
            Operation::CsrAttrs => "csrattrs",
            Operation::ServerKeygen => "serverkeygen",
        }
    }

    /// The HTTP method RFC 7030 prescribes for the operation.
    pub fn method(&self) -> http::Method {
        match self {
            Operation::CaCerts | Operation::CsrAttrs => http::Method::GET,
            Operation::SimpleEnroll | Operation::SimpleReenroll | Operation::ServerKeygen => {
                http::Method::POST
            }
        }
    }

    /// The operation named by a path segment; exact match, since URL paths are case-sensitive.
    pub fn from_segment(segment: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.as_str() == segment)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a path is not an EST request; the messages are meant for the client (404 answers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("the path is not under {WELL_KNOWN_PREFIX}")]
    NotEst,
    #[error("the path names no EST operation")]
    MissingOperation,
    #[error("the path has an empty segment")]
    EmptySegment,
    #[error("unknown EST operation \"{0}\"")]
    UnknownOperation(String),
    #[error("invalid EST label \"{label}\": {reason}")]
    InvalidLabel { label: String, reason: &'static str },
    #[error("too many path segments: expected {WELL_KNOWN_PREFIX}[<label>/]<operation>")]
    TooManySegments,
}

/// An arbitrary label (RFC 7030 section 3.2.2) selecting a CA or profile: 1 to 64 characters of
/// `[A-Za-z0-9._~-]` (URL-unreserved, so never percent-encoded), not `.` or `..`, and not an
/// operation name (which would make `/.well-known/est/<x>` ambiguous).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    /// Validates a label.
    pub fn new(label: &str) -> Result<Label, RouteError> {
        let invalid = |reason| RouteError::InvalidLabel {
            label: echo(label),
            reason,
        };
        if label.is_empty() {
            return Err(invalid("it is empty"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(invalid("it is longer than 64 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
        {
            return Err(invalid(
                "only A-Z, a-z, 0-9, '.', '_', '~' and '-' are allowed",
            ));
        }
        if label == "." || label == ".." {
            return Err(invalid("'.' and '..' are not labels"));
        }
        // Case-insensitive, and including `fullcmc`, so that no label can be confused with an
        // operation by a client or a proxy that folds case.
        if Operation::ALL
            .iter()
            .map(Operation::as_str)
            .chain(["fullcmc"])
            .any(|op| op.eq_ignore_ascii_case(label))
        {
            return Err(invalid("it is the name of an EST operation"));
        }
        Ok(Label(label.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Label {
    type Err = RouteError;

    fn from_str(s: &str) -> Result<Label, RouteError> {
        Label::new(s)
    }
}

/// Splits an EST request path (no query string) into its optional label and its operation.
///
/// `/.well-known/est/<op>` gives `(None, op)`, `/.well-known/est/<label>/<op>` gives
/// `(Some(label), op)`; anything else is an error the caller answers with 404. Segments are not
/// percent-decoded: labels and operations are plain, so `%2F` or `%2E%2E` just fail validation.
pub fn route(path: &str) -> Result<(Option<Label>, Operation), RouteError> {
    let rest = match path.strip_prefix(WELL_KNOWN_PREFIX) {
        Some(rest) => rest,
        None if path == WELL_KNOWN_PREFIX.trim_end_matches('/') => {
            return Err(RouteError::MissingOperation)
        }
        None => return Err(RouteError::NotEst),
    };
    if rest.is_empty() {
        return Err(RouteError::MissingOperation);
    }
    // At most three pieces, so a hostile path with thousands of slashes costs nothing.
    let mut segments = rest.splitn(3, '/');
    let first = segments.next().unwrap_or_default();
    let second = segments.next();
    if segments.next().is_some() {
        return Err(RouteError::TooManySegments);
    }
    if first.is_empty() || second.is_some_and(str::is_empty) {
        return Err(RouteError::EmptySegment);
    }
    match second {
        None => Ok((None, operation(first)?)),
        Some(op) => {
            let label = Label::new(first)?;
            Ok((Some(label), operation(op)?))
        }
    }
}

fn operation(segment: &str) -> Result<Operation, RouteError> {
    Operation::from_segment(segment).ok_or_else(|| RouteError::UnknownOperation(echo(segment)))
}

/// A bounded, escaped copy of client input for error messages (no control characters, no
/// unbounded reflection of hostile paths).
fn echo(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_ECHO_CHARS)
        .flat_map(char::escape_default)
        .collect();
    if s.chars().nth(MAX_ECHO_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> Label {
        match Label::new(s) {
            Ok(l) => l,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    #[test]
    fn operations_round_trip() {
        for op in Operation::ALL {
            assert_eq!(Operation::from_segment(op.as_str()), Some(op));
            assert_eq!(op.to_string(), op.as_str());
        }
        assert_eq!(Operation::CaCerts.as_str(), "cacerts");
        assert_eq!(Operation::SimpleEnroll.as_str(), "simpleenroll");
        assert_eq!(Operation::SimpleReenroll.as_str(), "simplereenroll");
        assert_eq!(Operation::CsrAttrs.as_str(), "csrattrs");
        assert_eq!(Operation::ServerKeygen.as_str(), "serverkeygen");
        assert_eq!(Operation::from_segment("CACERTS"), None);
        assert_eq!(Operation::from_segment("fullcmc"), None);
        assert_eq!(Operation::from_segment(""), None);
    }

    #[test]
    fn methods() {
        assert_eq!(Operation::CaCerts.method(), http::Method::GET);
        assert_eq!(Operation::CsrAttrs.method(), http::Method::GET);
        assert_eq!(Operation::SimpleEnroll.method(), http::Method::POST);
        assert_eq!(Operation::SimpleReenroll.method(), http::Method::POST);
        assert_eq!(Operation::ServerKeygen.method(), http::Method::POST);
    }

    #[test]
    fn routes_without_label() {
        for op in Operation::ALL {
            let path = format!("/.well-known/est/{op}");
            assert_eq!(route(&path), Ok((None, op)));
        }
    }

    #[test]
    fn routes_with_label() {
        assert_eq!(
            route("/.well-known/est/edge-ca/simpleenroll"),
            Ok((Some(label("edge-ca")), Operation::SimpleEnroll))
        );
        assert_eq!(
            route("/.well-known/est/A.b_c~d-9/cacerts"),
            Ok((Some(label("A.b_c~d-9")), Operation::CaCerts))
        );
        let long = "x".repeat(64);
        assert_eq!(
            route(&format!("/.well-known/est/{long}/csrattrs")),
            Ok((Some(label(&long)), Operation::CsrAttrs))
        );
    }

    #[test]
    fn not_est() {
        for p in [
            "",
            "/",
            "/cacerts",
            "/.well-known/",
            "/.well-known/estx/cacerts",
            "/.well-known/ESt/cacerts",
            "/.WELL-KNOWN/est/cacerts",
            ".well-known/est/cacerts",
            "//.well-known/est/cacerts",
            "/x/.well-known/est/cacerts",
            "https://h/.well-known/est/cacerts",
        ] {
            assert_eq!(route(p), Err(RouteError::NotEst), "{p:?}");
        }
    }

    #[test]
    fn missing_operation_and_empty_segments() {
        assert_eq!(route("/.well-known/est"), Err(RouteError::MissingOperation));
        assert_eq!(
            route("/.well-known/est/"),
            Err(RouteError::MissingOperation)
        );
        for p in [
            "/.well-known/est//cacerts",
            "/.well-known/est/cacerts/",
            "/.well-known/est/lbl/",
            "/.well-known/est//",
        ] {
            assert_eq!(route(p), Err(RouteError::EmptySegment), "{p:?}");
        }
        assert_eq!(
            route("/.well-known/est/lbl/cacerts/"),
            Err(RouteError::TooManySegments)
        );
        assert_eq!(
            route("/.well-known/est///"),
            Err(RouteError::TooManySegments)
        );
    }

    #[test]
    fn unknown_operations() {
        assert!(matches!(
            route("/.well-known/est/fullcmc"),
            Err(RouteError::UnknownOperation(s)) if s == "fullcmc"
        ));
        assert!(matches!(
            route("/.well-known/est/CACERTS"),
            Err(RouteError::UnknownOperation(_))
        ));
        assert!(matches!(
            route("/.well-known/est/lbl/nope"),
            Err(RouteError::UnknownOperation(s)) if s == "nope"
        ));
        assert!(matches!(
            route("/.well-known/est/cacerts?x=1"),
            Err(RouteError::UnknownOperation(_))
        ));
    }

    #[test]
    fn invalid_labels() {
        for p in [
            "/.well-known/est/../cacerts",
            "/.well-known/est/./cacerts",
            "/.well-known/est/%2E%2E/cacerts",
            "/.well-known/est/a%2Fb/cacerts",
            "/.well-known/est/cacerts/simpleenroll",
            "/.well-known/est/CaCerts/simpleenroll",
            "/.well-known/est/fullcmc/cacerts",
            "/.well-known/est/caf\u{e9}/cacerts",
            "/.well-known/est/a b/cacerts",
            "/.well-known/est/a\0b/cacerts",
            "/.well-known/est/a\nb/cacerts",
        ] {
            assert!(
                matches!(route(p), Err(RouteError::InvalidLabel { .. })),
                "{p:?}: {:?}",
                route(p)
            );
        }
        let too_long = "x".repeat(65);
        assert!(matches!(
            route(&format!("/.well-known/est/{too_long}/cacerts")),
            Err(RouteError::InvalidLabel { .. })
        ));
    }

    #[test]
    fn too_many_segments() {
        assert_eq!(
            route("/.well-known/est/a/b/cacerts"),
            Err(RouteError::TooManySegments)
        );
        assert_eq!(
            route("/.well-known/est/../../etc/passwd"),
            Err(RouteError::TooManySegments)
        );
        let hostile = format!("/.well-known/est/{}", "a/".repeat(100_000));
        assert_eq!(route(&hostile), Err(RouteError::TooManySegments));
    }

    #[test]
    fn hostile_input_is_echoed_bounded_and_escaped() {
        let huge = format!("/.well-known/est/{}", "z".repeat(1_000_000));
        let err = route(&huge).err();
        let Some(RouteError::UnknownOperation(shown)) = err else {
            panic!("{err:?}");
        };
        assert!(shown.len() <= MAX_ECHO_CHARS + 3);
        assert!(shown.ends_with("..."));

        let err = route("/.well-known/est/\u{1b}[31m\u{202e}\r\n/cacerts")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("invalid EST label"), "{err}");
        assert!(
            !err.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{err:?}"
        );

        // Multi-byte characters must not be cut in the middle.
        let err = route(&format!("/.well-known/est/{}", "\u{e9}".repeat(200)));
        assert!(matches!(err, Err(RouteError::UnknownOperation(_))));
    }

    #[test]
    fn label_rules() {
        for ok in ["a", "edge-ca", "Z9", "a.b", "...", "~", "-", "_", "x.."] {
            assert_eq!(label(ok).as_str(), ok);
            assert_eq!(label(ok).to_string(), ok);
            assert_eq!(ok.parse::<Label>(), Ok(label(ok)));
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a%20b",
            "a b",
            "é",
            "a+b",
            "a:b",
            "a@b",
            "simpleenroll",
            "SimpleReEnroll",
            "csrattrs",
            "serverkeygen",
            "FULLCMC",
        ] {
            assert!(Label::new(bad).is_err(), "{bad:?}");
        }
        assert!(Label::new(&"x".repeat(64)).is_ok());
        assert!(Label::new(&"x".repeat(65)).is_err());
        assert!(label("a") < label("b"));
    }

    #[test]
    fn messages_are_readable() {
        assert_eq!(
            RouteError::NotEst.to_string(),
            "the path is not under /.well-known/est/"
        );
        assert_eq!(
            route("/.well-known/est/bogus").err().map(|e| e.to_string()),
            Some("unknown EST operation \"bogus\"".to_owned())
        );
        assert_eq!(
            Label::new("a/b").err().map(|e| e.to_string()),
            Some(
                "invalid EST label \"a/b\": only A-Z, a-z, 0-9, '.', '_', '~' and '-' are allowed"
                    .to_owned()
            )
        );
    }
}
