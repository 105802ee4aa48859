//! Direct methods, received and answered over the edgeHub MQTT connection of [`super::twin`]:
//! requests arrive on `$iothub/methods/POST/{method}/?$rid={rid}`, answers go to
//! `$iothub/methods/res/{status}/?$rid={rid}`. Request and answer payloads are JSON documents
//! of at most [`MAX_PAYLOAD`] bytes (IoT Hub's limit for direct methods; edgeHub itself takes
//! messages up to 256 KiB).
//!
//! - `getStatus`: the reported document, plus each issuer's and the TLS server certificate's
//!   expiry and each upstream's health, as of now;
//! - `queryJournal`: issued certificates by CN, serial, fingerprint or time range, newest
//!   first, a bounded page at a time;
//! - `reloadFiles`: the files of the running configuration (issuers, TLS, trust sets) read
//!   again and validated like a twin change (also on SIGHUP).
//!
//! The statuses are the direct-method answer's own (IoT Hub relays them to the caller); they
//! are chosen like HTTP's: 400 for a request that cannot be served as asked, 404 for an
//! unknown method, 503 while there is nothing to answer from, 500 for the module's own failure.

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::journal::JournalEntry;

/// Largest request or answer payload: IoT Hub's limit for direct methods (128 KB).
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Entries `queryJournal` answers when the request names no `limit`.
pub const DEFAULT_PAGE: usize = 20;
/// The largest `limit` `queryJournal` accepts.
pub const MAX_PAGE: usize = 100;
/// Longest `$rid` answered (edgeHub's are short decimal or hex numbers).
const MAX_RID: usize = 64;

pub const TOPIC_METHODS: &str = "$iothub/methods/POST/#";
const METHOD_PREFIX: &str = "$iothub/methods/POST/";

/// The methods this module answers.
pub const METHODS: [&str; 3] = ["getStatus", "queryJournal", "reloadFiles"];

/// Why a method call was not served.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MethodError {
    #[error("unknown method {0:?}: this module answers getStatus, queryJournal and reloadFiles")]
    Unknown(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Failed(String),
}

impl MethodError {
    /// The status of the direct-method answer.
    pub fn status(&self) -> u16 {
        match self {
            MethodError::BadRequest(_) => 400,
            MethodError::Unknown(_) => 404,
            MethodError::Failed(_) => 500,
            MethodError::NotReady(_) => 503,
        }
    }

    /// The answer's payload: `{"error": "<why>"}`.
    pub fn body(&self) -> Value {
        json!({ "error": self.to_string() })
    }
}

/// An answer on its way back to the MQTT connection the request came in on.
#[derive(Debug)]
pub struct MethodReply {
    pub rid: String,
    pub status: u16,
    /// The JSON payload, at most [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

/// A direct-method call, answered once with [`MethodCall::answer`].
#[derive(Debug)]
pub struct MethodCall {
    pub name: String,
    pub rid: String,
    pub payload: Vec<u8>,
    replies: mpsc::UnboundedSender<MethodReply>,
}

impl MethodCall {
    pub fn new(
        name: String,
        rid: String,
        payload: Vec<u8>,
        replies: mpsc::UnboundedSender<MethodReply>,
    ) -> MethodCall {
        MethodCall {
            name,
            rid,
            payload,
            replies,
        }
    }

    /// Sends the answer (dropped if the connection it came on has closed: the caller got a
    /// timeout from IoT Hub already). An answer above [`MAX_PAYLOAD`] becomes a 500.
    pub fn answer(self, result: Result<Value, MethodError>) {
        let (status, body) = match result {
            Ok(body) => (200, body),
            Err(e) => (e.status(), e.body()),
        };
        let mut payload = body.to_string().into_bytes();
        let mut status = status;
        if payload.len() > MAX_PAYLOAD {
            tracing::error!(
                method = %self.name,
                bytes = payload.len(),
                "direct method answer above the payload limit"
            );
            status = 500;
            payload = MethodError::Failed(format!(
                "the answer would be {} bytes; direct method payloads are at most {MAX_PAYLOAD}",
                payload.len()
            ))
            .body()
            .to_string()
            .into_bytes();
        }
        tracing::info!(method = %self.name, status, bytes = payload.len(), "direct method answered");
        let _ = self.replies.send(MethodReply {
            rid: self.rid,
            status,
            payload,
        });
    }

    /// The payload as a JSON object: an empty payload and `null` count as `{}`; a payload
    /// above [`MAX_PAYLOAD`] or not an object is refused.
    pub fn object(&self) -> Result<Map<String, Value>, MethodError> {
        request_object(&self.payload)
    }
}

pub(crate) fn request_object(payload: &[u8]) -> Result<Map<String, Value>, MethodError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(MethodError::BadRequest(format!(
            "payload of {} bytes; direct method payloads are at most {MAX_PAYLOAD}",
            payload.len()
        )));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(Value::Null) => Ok(Map::new()),
        Ok(_) => Err(MethodError::BadRequest(
            "the payload must be a JSON object".into(),
        )),
        Err(e) => Err(MethodError::BadRequest(format!(
            "the payload is not JSON: {e}"
        ))),
    }
}

/// The method name and `$rid` of a request topic (`$iothub/methods/POST/{name}/?$rid={rid}`).
/// `None` for other topics, or when the `$rid` is missing or could not be answered safely (an
/// answer topic is built from it: at most 64 characters, no MQTT wildcards or separators).
pub fn parse_topic(topic: &str) -> Option<(String, String)> {
    let rest = topic.strip_prefix(METHOD_PREFIX)?;
    let (name, query) = rest.split_once("/?")?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let rid = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "$rid")
        .map(|(_, v)| v)?;
    let safe = !rid.is_empty()
        && rid.len() <= MAX_RID
        && rid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    safe.then(|| (name.to_owned(), rid.to_owned()))
}

/// The answer topic of a request.
pub fn reply_topic(status: u16, rid: &str) -> String {
    format!("$iothub/methods/res/{status}/?$rid={rid}")
}

/// What `queryJournal` looks for.
#[derive(Debug, Default, PartialEq)]
pub struct JournalQuery {
    /// The certificate's subject CN, exactly, or its beginning when it ends with `*`.
    pub cn: Option<String>,
    /// Serial number, hex (any case, colons allowed, leading zeros ignored).
    pub serial: Option<String>,
    /// SHA-256 of the certificate's DER, 64 hex digits (any case, colons allowed).
    pub fingerprint: Option<String>,
    /// Issued at or after.
    pub from: Option<OffsetDateTime>,
    /// Issued before.
    pub to: Option<OffsetDateTime>,
    /// Entries per answer, 1 to [`MAX_PAGE`].
    pub limit: usize,
    /// Only entries older than this position (the `next` of an earlier answer).
    pub before: Option<u64>,
    /// Include each certificate (base64 DER).
    pub certificates: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawQuery {
    cn: Option<String>,
    serial: Option<String>,
    fingerprint: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<u64>,
    before: Option<u64>,
    #[serde(default)]
    certificates: bool,
}

impl JournalQuery {
    pub fn parse(request: Map<String, Value>) -> Result<JournalQuery, MethodError> {
        let raw: RawQuery = serde_json::from_value(Value::Object(request)).map_err(|e| {
            MethodError::BadRequest(format!(
                "queryJournal: {e} (fields: cn, serial, fingerprint, from, to, limit, before, certificates)"
            ))
        })?;
        let limit = match raw.limit {
            None => DEFAULT_PAGE,
            Some(n) if (1..=MAX_PAGE as u64).contains(&n) => n as usize,
            Some(n) => {
                return Err(MethodError::BadRequest(format!(
                    "queryJournal: limit {n}: must be 1 to {MAX_PAGE}"
                )))
            }
        };
        let time = |field: &str, value: Option<String>| {
            value
                .map(|v| {
                    OffsetDateTime::parse(&v, &Rfc3339).map_err(|_| {
                        MethodError::BadRequest(format!(
                            "queryJournal: {field}: {v:?} is not an RFC 3339 time (e.g. 2026-01-31T00:00:00Z)"
                        ))
                    })
                })
                .transpose()
        };
        let serial = raw
            .serial
            .map(|s| {
                let hex = normalise_hex(&s);
                if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(MethodError::BadRequest(format!(
                        "queryJournal: serial {s:?} is not hexadecimal"
                    )));
                }
                Ok(strip_zeros(&hex).to_owned())
            })
            .transpose()?;
        let fingerprint = raw
            .fingerprint
            .map(|f| {
                let hex = normalise_hex(&f);
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(MethodError::BadRequest(format!(
                        "queryJournal: fingerprint {f:?} is not a SHA-256 (64 hex digits)"
                    )));
                }
                Ok(hex)
            })
            .transpose()?;
        if let Some(cn) = &raw.cn {
            if cn.is_empty() || cn.len() > 256 {
                return Err(MethodError::BadRequest(
                    "queryJournal: cn must be 1 to 256 characters".into(),
                ));
            }
        }
        let query = JournalQuery {
            cn: raw.cn,
            serial,
            fingerprint,
            from: time("from", raw.from)?,
            to: time("to", raw.to)?,
            limit,
            before: raw.before,
            certificates: raw.certificates,
        };
        if let (Some(from), Some(to)) = (query.from, query.to) {
            if from >= to {
                return Err(MethodError::BadRequest(
                    "queryJournal: from must be earlier than to".into(),
                ));
            }
        }
        Ok(query)
    }

    fn matches(&self, entry: &JournalEntry) -> bool {
        if let Some(serial) = &self.serial {
            if strip_zeros(&normalise_hex(&entry.serial)) != serial {
                return false;
            }
        }
        if let Some(fingerprint) = &self.fingerprint {
            if normalise_hex(&entry.sha256) != *fingerprint {
                return false;
            }
        }
        if self.from.is_some() || self.to.is_some() {
            let Ok(time) = OffsetDateTime::parse(&entry.time, &Rfc3339) else {
                return false;
            };
            if self.from.is_some_and(|from| time < from) || self.to.is_some_and(|to| time >= to) {
                return false;
            }
        }
        if let Some(cn) = &self.cn {
            let (prefix, exact) = match cn.strip_suffix('*') {
                Some(prefix) => (prefix, false),
                None => (cn.as_str(), true),
            };
            // Cheap test on the text first; the certificate's own CN decides.
            if !entry.subject.contains(prefix) {
                return false;
            }
            return common_names(&entry.certificate).iter().any(|name| {
                if exact {
                    name == prefix
                } else {
                    name.starts_with(prefix)
                }
            });
        }
        true
    }
}

fn normalise_hex(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn strip_zeros(hex: &str) -> &str {
    let stripped = hex.trim_start_matches('0');
    if stripped.is_empty() {
        "0"
    } else {
        stripped
    }
}

/// The subject CNs of a base64 DER certificate.
fn common_names(certificate_b64: &str) -> Vec<String> {
    use base64::Engine;
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(certificate_b64) else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect()
}

/// Reads the journal at `path` and answers `query`: matching entries newest first, at most
/// `limit` and within [`MAX_PAYLOAD`], each with its position; `next` is the `before` that
/// continues the listing (`null` at its end). Blocking: run it off the async runtime.
pub fn query_journal(path: &Path, query: &JournalQuery) -> Result<Value, MethodError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(json!({ "entries": [], "matched": 0, "next": null }));
        }
        Err(e) => {
            return Err(MethodError::Failed(format!(
                "cannot read the journal {}: {e}",
                path.display()
            )))
        }
    };
    // The newest `limit + 1` matches older than `before`, and how many match in all.
    let mut window: VecDeque<(u64, JournalEntry)> = VecDeque::with_capacity(query.limit + 1);
    let mut matched = 0u64;
    for (position, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| {
            MethodError::Failed(format!("cannot read the journal {}: {e}", path.display()))
        })?;
        let position = position as u64;
        let Ok(entry) = serde_json::from_str::<JournalEntry>(&line) else {
            continue; // a torn line
        };
        if !query.matches(&entry) {
            continue;
        }
        matched += 1;
        if query.before.is_some_and(|before| position >= before) {
            continue;
        }
        if window.len() == query.limit + 1 {
            window.pop_front();
        }
        window.push_back((position, entry));
    }
    let mut more = window.len() > query.limit;
    if more {
        window.pop_front();
    }
    let mut entries: Vec<Value> = Vec::with_capacity(window.len());
    let mut size = 200; // the envelope
    let mut last = None;
    for (position, entry) in window.into_iter().rev() {
        let value = entry_value(position, &entry, query.certificates);
        let bytes = value.to_string().len() + 1;
        if size + bytes > MAX_PAYLOAD {
            more = true;
            break;
        }
        size += bytes;
        last = Some(position);
        entries.push(value);
    }
    let next = if more { last } else { None };
    Ok(json!({ "entries": entries, "matched": matched, "next": next }))
}

fn entry_value(position: u64, entry: &JournalEntry, certificate: bool) -> Value {
    let mut value = json!({
        "position": position,
        "time": entry.time,
        "serial": entry.serial,
        "subject": entry.subject,
        "sans": entry.sans,
        "label": entry.label,
        "operation": entry.operation,
        "identity": entry.identity,
        "profile": entry.profile,
        "notBefore": entry.not_before,
        "notAfter": entry.not_after,
        "sha256": entry.sha256,
        "issuedBy": entry.issued_by,
    });
    if certificate {
        value["certificate"] = json!(entry.certificate);
    }
    value
}

/// RFC 3339, and the whole seconds from now until `t` (negative once past).
pub fn expiry(t: OffsetDateTime, now: OffsetDateTime) -> Value {
    json!({
        "notAfter": t.format(&Rfc3339).unwrap_or_default(),
        "expiresInSecs": (t - now).whole_seconds(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics() {
        assert_eq!(
            parse_topic("$iothub/methods/POST/getStatus/?$rid=1f"),
            Some(("getStatus".into(), "1f".into()))
        );
        assert_eq!(
            parse_topic("$iothub/methods/POST/queryJournal/?$rid=7&x=y"),
            Some(("queryJournal".into(), "7".into()))
        );
        // No rid, an empty rid, or one that would make another topic: not answered.
        assert_eq!(parse_topic("$iothub/methods/POST/getStatus/"), None);
        assert_eq!(parse_topic("$iothub/methods/POST/getStatus/?$rid="), None);
        assert_eq!(
            parse_topic("$iothub/methods/POST/getStatus/?$rid=1/#"),
            None
        );
        assert_eq!(
            parse_topic("$iothub/methods/POST/getStatus/?$rid=a+b"),
            None
        );
        assert_eq!(
            parse_topic(&format!("$iothub/methods/POST/x/?$rid={}", "1".repeat(65))),
            None
        );
        assert_eq!(parse_topic("$iothub/methods/POST//?$rid=1"), None);
        assert_eq!(parse_topic("$iothub/twin/res/200/?$rid=1"), None);
        assert_eq!(reply_topic(200, "1f"), "$iothub/methods/res/200/?$rid=1f");
    }

    #[test]
    fn request_payloads() {
        assert_eq!(request_object(b""), Ok(Map::new()));
        assert_eq!(request_object(b"null"), Ok(Map::new()));
        assert!(request_object(b"[1]").is_err());
        assert!(request_object(b"{").is_err());
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(request_object(&big).unwrap_err().status(), 400);
    }

    fn query(v: Value) -> Result<JournalQuery, MethodError> {
        JournalQuery::parse(v.as_object().unwrap().clone())
    }

    #[test]
    fn journal_queries_are_bounded_and_checked() {
        assert_eq!(query(json!({})).unwrap().limit, DEFAULT_PAGE);
        assert_eq!(query(json!({"limit": 100})).unwrap().limit, 100);
        for bad in [
            json!({"limit": 0}),
            json!({"limit": 101}),
            json!({"limit": -1}),
            json!({"limit": "5"}),
            json!({"serial": "xyz"}),
            json!({"fingerprint": "abcd"}),
            json!({"from": "yesterday"}),
            json!({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}),
            json!({"cn": ""}),
            json!({"commonName": "x"}),
        ] {
            let e = query(bad.clone()).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}: {e}");
        }
        let q = query(json!({"serial": "00:0A:bc", "fingerprint": "AB".repeat(32)})).unwrap();
        assert_eq!(q.serial.as_deref(), Some("abc"));
        assert_eq!(q.fingerprint, Some("ab".repeat(32)));
    }
}
