//! Reported properties: the document the module wants the twin to show, made to fit edgeHub's
//! validator (names without `.`, `$`, `#`, whitespace or control characters and at most
//! 1024 bytes, depth at most 10, strings at most 4096 bytes, integers within ±2^52, no null
//! in arrays, at most 32 KB per patch), and the patches that bring the twin to it.

use std::sync::Mutex;

use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Notify;

use crate::config::{Config, Mode};
use crate::runtime::Runtime;

pub const MAX_NAME_BYTES: usize = 1024;
pub const MAX_DEPTH: usize = 10;
pub const MAX_STRING_BYTES: usize = 4096;
pub const MAX_PATCH_BYTES: usize = 32 * 1024;
const MAX_INTEGER: i64 = 1 << 52;
/// Labels and upstreams reported at most (a patch must stay under 32 KB).
const MAX_ENTRIES: usize = 40;

/// Certificates issued (here or upstream), obtained upstream, and requests refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub issued: u64,
    pub forwarded: u64,
    pub refused: u64,
}

/// A desired configuration the module refused, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub version: Option<i64>,
    pub reason: String,
    pub time: OffsetDateTime,
}

/// Everything the reported document is made of.
pub struct ReportInput<'a> {
    pub status: &'a str,
    /// `$version` of the desired properties in force (`None`: not from the twin).
    pub config_version: Option<i64>,
    /// `twin` or `last-known-good`.
    pub config_source: Option<&'a str>,
    pub rejection: Option<&'a Rejection>,
    pub config: Option<&'a Config>,
    pub runtime: Option<&'a Runtime>,
    pub counters: Option<Counters>,
    /// Changes accepted that take effect at the next start (e.g. the journal's path).
    pub pending_restart: &'a [String],
}

/// The whole reported document (already made to fit the limits).
pub fn document(input: &ReportInput<'_>) -> Map<String, Value> {
    let mut doc = Map::new();
    doc.insert("status".into(), json!(input.status));
    doc.insert("configVersion".into(), json!(input.config_version));
    doc.insert("configSource".into(), json!(input.config_source));
    doc.insert(
        "lastRejection".into(),
        input.rejection.map_or(
            Value::Null,
            |r| json!({ "version": r.version, "reason": r.reason, "time": rfc3339(r.time) }),
        ),
    );
    doc.insert(
        "pendingRestart".into(),
        if input.pending_restart.is_empty() {
            Value::Null
        } else {
            json!(input.pending_restart.join(", "))
        },
    );
    doc.insert(
        "software".into(),
        json!(format!("edge-est {}", env!("CARGO_PKG_VERSION"))),
    );
    if let (Some(config), Some(runtime)) = (input.config, input.runtime) {
        let (labels, upstreams) = labels_and_upstreams(config, runtime);
        doc.insert("labels".into(), Value::Object(labels));
        doc.insert("upstreams".into(), Value::Object(upstreams));
        doc.insert("enrolledIssuers".into(), enrolled_issuers(runtime));
        doc.insert(
            "serverCertificate".into(),
            json!({ "notAfter": runtime.tls_not_after.map(rfc3339) }),
        );
    }
    if let Some(c) = input.counters {
        doc.insert(
            "counters".into(),
            json!({ "issued": c.issued, "forwarded": c.forwarded, "refused": c.refused }),
        );
    }
    match sanitize(Value::Object(doc), 1) {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// Per label: its mode, and its issuer (subject, notAfter) or upstream; per upstream used by
/// a label: its URL, its health (`unknown` before any contact, `up`, `away`,
/// `misconfigured`), since when, and whether it answered at the last contact.
fn labels_and_upstreams(
    config: &Config,
    runtime: &Runtime,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut labels = Map::new();
    let mut upstreams = Map::new();
    for label in config.labels.iter().take(MAX_ENTRIES) {
        let key = label
            .name
            .clone()
            .unwrap_or_else(|| "(unlabeled)".to_owned());
        let route = match &label.name {
            None => None,
            Some(name) => match crate::est::Label::new(name) {
                Ok(l) => Some(l),
                Err(_) => continue,
            },
        };
        let Some(rt) = runtime.label(&route) else {
            continue;
        };
        let mut entry = Map::new();
        // The mode in force: an enrolled issuer without a CA forwards.
        entry.insert(
            "mode".into(),
            json!(match rt.mode {
                Mode::Sign => "sign",
                Mode::Forward => "forward",
                Mode::Auto => "auto",
            }),
        );
        if rt.local.is_none() {
            if let Some(name) = label
                .issuer
                .as_ref()
                .filter(|i| config.enrolled_issuers.contains_key(*i))
            {
                entry.insert(
                    "issuer".into(),
                    json!({ "name": name, "state": "no CA yet: forwarding to the layer above" }),
                );
            }
        }
        if let Some(issuer) = &rt.local {
            entry.insert(
                "issuer".into(),
                json!({
                    "name": label.issuer,
                    "subject": issuer.subject().to_string(),
                    "notAfter": rfc3339(issuer.not_after()),
                }),
            );
        }
        if let (Some(upstream), Some(name)) = (&rt.upstream, &label.upstream) {
            entry.insert("upstream".into(), json!(name));
            if upstreams.len() < MAX_ENTRIES {
                let url = config.upstreams.get(name).map(|u| u.url.clone());
                let health = upstream.health.snapshot();
                upstreams.insert(
                    name.clone(),
                    json!({
                        "url": url,
                        "state": health.state.as_str(),
                        "since": rfc3339(OffsetDateTime::from_unix_timestamp(health.since as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)),
                        "reachable": upstream.is_reachable(),
                    }),
                );
            }
        }
        labels.insert(key, Value::Object(entry));
    }
    (labels, upstreams)
}

/// Per enrolled issuer: `enrolled` with its CA's notAfter and when it renews, or
/// `forwarding` while it has none; the earlier CAs still trusted.
fn enrolled_issuers(runtime: &Runtime) -> Value {
    let mut map = Map::new();
    for e in runtime.enrolled().iter().take(MAX_ENTRIES) {
        let entry = match e.current {
            Some((from, not_after)) => json!({
                "state": "enrolled",
                "notAfter": rfc3339(not_after),
                "renewAt": rfc3339(crate::issue::delegation::renew_point(from, not_after)),
                "previousCas": e.previous.len(),
            }),
            None => json!({
                "state": "forwarding",
                "previousCas": e.previous.len(),
            }),
        };
        map.insert(e.name.clone(), entry);
    }
    Value::Object(map)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Makes `value` acceptable to edgeHub's reported-properties validator; `depth` is the depth
/// of `value` itself (the document is depth 1).
pub fn sanitize(value: Value, depth: usize) -> Value {
    match value {
        Value::Object(map) if depth > MAX_DEPTH => {
            let _ = map;
            Value::String("(omitted: nested too deep)".into())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (sanitize_name(&k), sanitize(v, depth + 1)))
                .collect(),
        ),
        Value::Array(_) if depth > MAX_DEPTH => Value::String("(omitted: nested too deep)".into()),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .filter(|v| !v.is_null())
                .map(|v| sanitize(v, depth + 1))
                .collect(),
        ),
        Value::String(text) => Value::String(truncate(text, MAX_STRING_BYTES)),
        Value::Number(n) => match n.as_i64() {
            Some(i) if !(-MAX_INTEGER..=MAX_INTEGER).contains(&i) => Value::String(i.to_string()),
            None if n.as_u64().is_some() => Value::String(n.to_string()),
            _ => Value::Number(n),
        },
        other => other,
    }
}

/// A property name edgeHub accepts: `.`, `$`, `#`, whitespace and control characters become
/// `_`; at most 1024 bytes.
pub fn sanitize_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c == '.' || c == '$' || c == '#' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let cleaned = if cleaned.is_empty() {
        "_".to_owned()
    } else {
        cleaned
    };
    truncate(cleaned, MAX_NAME_BYTES)
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    const MARK: &str = "…";
    let mut end = max - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(MARK);
    text
}

/// The merge patch that turns `old` into `new` (keys gone from `new` become `null`); `None`
/// when they are equal.
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mut patch = Map::new();
    for (key, value) in new {
        match (old.get(key), value) {
            (Some(before), after) if before == after => {}
            (Some(Value::Object(before)), Value::Object(after)) => {
                if let Some(inner) = diff(before, after) {
                    patch.insert(key.clone(), Value::Object(inner));
                }
            }
            _ => {
                patch.insert(key.clone(), value.clone());
            }
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    (!patch.is_empty()).then_some(patch)
}

/// Splits a patch into patches of at most 32 KB: by top-level property, and a property that
/// alone is too large is replaced by a note.
pub fn split(patch: Map<String, Value>) -> Vec<Value> {
    let whole = Value::Object(patch);
    if size(&whole) <= MAX_PATCH_BYTES {
        return vec![whole];
    }
    let Value::Object(patch) = whole else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut current = Map::new();
    for (key, value) in patch {
        let mut single = Map::new();
        single.insert(key.clone(), value);
        if size(&Value::Object(single.clone())) > MAX_PATCH_BYTES {
            single.insert(
                key.clone(),
                json!("(omitted: larger than a reported patch may be)"),
            );
        }
        let mut candidate = current.clone();
        candidate.extend(single.clone());
        if size(&Value::Object(candidate.clone())) > MAX_PATCH_BYTES {
            out.push(Value::Object(std::mem::take(&mut current)));
            current = single;
        } else {
            current = candidate;
        }
    }
    if !current.is_empty() {
        out.push(Value::Object(current));
    }
    out
}

fn size(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

/// What the module wants reported, and what the twin is known to hold. The MQTT side takes
/// patches from it whenever it is connected and woken.
#[derive(Default)]
pub struct Reporter {
    state: Mutex<ReportState>,
    changed: Notify,
}

#[derive(Default)]
struct ReportState {
    wanted: Map<String, Value>,
    /// The twin's reported properties as last known (from the twin GET, plus the patches sent
    /// since); `None` before the first twin GET of a connection.
    known: Option<Map<String, Value>>,
}

impl Reporter {
    /// Sets the whole document to report and wakes the sender.
    pub fn set(&self, document: Map<String, Value>) {
        if let Ok(mut state) = self.state.lock() {
            state.wanted = document;
        }
        self.changed.notify_one();
    }

    pub fn wanted(&self) -> Map<String, Value> {
        self.state
            .lock()
            .map(|s| s.wanted.clone())
            .unwrap_or_default()
    }

    /// The twin's reported section as the twin GET returned it (`$` keys dropped): patches
    /// are computed against it, so stale properties of an earlier run get deleted.
    pub fn twin_reported(&self, reported: &Value) {
        let known = reported
            .as_object()
            .map(crate::edge::desired::strip_metadata)
            .unwrap_or_default();
        if let Ok(mut state) = self.state.lock() {
            state.known = Some(known);
        }
        self.changed.notify_one();
    }

    /// Forgets what the twin holds (after a disconnect).
    pub fn disconnected(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.known = None;
        }
    }

    /// The patches to send now (none before the twin GET answered, or when the twin is up to
    /// date); they are taken as sent.
    pub fn take_patches(&self) -> Vec<Value> {
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        let Some(known) = &state.known else {
            return Vec::new();
        };
        let Some(patch) = diff(known, &state.wanted) else {
            return Vec::new();
        };
        state.known = Some(state.wanted.clone());
        split(patch)
    }

    /// Waits until the wanted document changes or the twin's state becomes known.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_strings_depth_and_integers_fit_the_validator() {
        let mut deep = json!("leaf");
        for _ in 0..12 {
            deep = json!({ "d": deep });
        }
        let value = json!({
            "a.b$c#d e": 1,
            "long": "x".repeat(5000),
            "big": 1u64 << 60,
            "list": [1, null, 2],
            "deep": deep,
        });
        let clean = sanitize(value, 1);
        assert!(clean.get("a_b_c_d_e").is_some());
        let long = clean["long"].as_str().unwrap();
        assert!(long.len() <= MAX_STRING_BYTES && long.ends_with('…'));
        assert_eq!(clean["big"], json!((1u64 << 60).to_string()));
        assert_eq!(clean["list"], json!([1, 2]));
        fn depth(v: &Value) -> usize {
            match v {
                Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
                Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }
        assert!(depth(&clean) <= MAX_DEPTH, "{}", depth(&clean));
        let name = sanitize_name(&"é".repeat(600));
        assert!(name.len() <= MAX_NAME_BYTES && name.ends_with('…'));
    }

    #[test]
    fn diff_is_a_merge_patch_that_deletes_what_is_gone() {
        let old = json!({"status": "running", "labels": {"a": {"mode": "sign"}, "b": {"mode": "sign"}}, "stale": 1});
        let new =
            json!({"status": "running", "labels": {"a": {"mode": "forward"}}, "configVersion": 3});
        let patch = diff(old.as_object().unwrap(), new.as_object().unwrap()).unwrap();
        assert_eq!(
            Value::Object(patch.clone()),
            json!({"labels": {"a": {"mode": "forward"}, "b": null}, "stale": null, "configVersion": 3})
        );
        let mut applied = old.clone();
        crate::edge::desired::merge_patch(&mut applied, &Value::Object(patch));
        assert_eq!(applied, new);
        assert!(diff(new.as_object().unwrap(), new.as_object().unwrap()).is_none());
    }

    #[test]
    fn large_patches_are_split_under_32_kb() {
        let mut patch = Map::new();
        for i in 0..20 {
            patch.insert(format!("p{i}"), json!("y".repeat(3000)));
        }
        let huge: Map<String, Value> = (0..20)
            .map(|i| (format!("k{i}"), json!("z".repeat(4000))))
            .collect();
        patch.insert("huge".into(), Value::Object(huge));
        let parts = split(patch);
        assert!(parts.len() >= 2);
        for part in &parts {
            assert!(size(part) <= MAX_PATCH_BYTES);
        }
        assert!(parts
            .iter()
            .any(|p| p.get("huge").is_some_and(Value::is_string)));
        assert_eq!(
            parts
                .iter()
                .map(|p| p.as_object().unwrap().len())
                .sum::<usize>(),
            21
        );
    }

    #[test]
    fn reporter_sends_nothing_before_the_twin_is_known_then_only_changes() {
        let reporter = Reporter::default();
        reporter.set(
            json!({"status": "running", "configVersion": 1})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert!(reporter.take_patches().is_empty());
        reporter.twin_reported(&json!({"status": "old", "gone": true, "$version": 9}));
        assert_eq!(
            reporter.take_patches(),
            vec![json!({"status": "running", "configVersion": 1, "gone": null})]
        );
        assert!(reporter.take_patches().is_empty());
        reporter.set(
            json!({"status": "running", "configVersion": 2})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(reporter.take_patches(), vec![json!({"configVersion": 2})]);
        reporter.disconnected();
        assert!(reporter.take_patches().is_empty());
    }
}
