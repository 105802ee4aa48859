//! The health of an upstream, as this layer sees it: `unknown` (not asked since start),
//! `up`, `away` (cannot be reached, or did not answer in time) or `misconfigured` (answered in
//! a way that only this layer's configuration or the upper layer's can fix: a TLS certificate
//! not trusted, 404 on the EST path, this layer's RA credentials refused).
//!
//! After a failure the layer answers from its fallback at once (an `auto` label signs
//! locally, a `forward` label answers 503) instead of paying the timeout again on every
//! request, while a background probe asks the upstream's `/cacerts` with a bounded back-off
//! and flips the state back to `up` when it answers. A misconfigured upstream never lets an
//! `auto` label sign locally: a layer that is wrong must not look like a layer cut off.
//! The state is logged once per change (an error for `misconfigured`) and kept on disk, so a
//! layer restarted during an outage knows at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::upstream::Upstream;

/// First pause of the background probe; it doubles up to the upstream's `probe_max_secs`.
pub const FIRST_PROBE: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Unknown,
    Up,
    Away,
    Misconfigured,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Away => "away",
            State::Misconfigured => "misconfigured",
        }
    }

    pub const ALL: [State; 4] = [State::Unknown, State::Up, State::Away, State::Misconfigured];
}

/// What one exchange with the upstream showed.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// It answered over trusted TLS (whatever the status, unless misconfigured).
    Answered,
    Away(String),
    Misconfigured(String),
}

/// The state and why, as reported.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub state: State,
    /// Seconds since the Unix epoch at which the state began.
    pub since: u64,
    /// What the last failure was (empty when up).
    #[serde(default)]
    pub cause: String,
}

pub struct Health {
    inner: Mutex<Inner>,
    probing: AtomicBool,
    /// Identifies the upstream's configuration: state is carried over (across a
    /// reconfiguration or a restart) only to the same one.
    fingerprint: String,
    store: OnceLock<PathBuf>,
}

struct Inner {
    snapshot: Snapshot,
    /// The upstream label the failing request used: the probe asks the same `/cacerts`.
    probe_label: Option<String>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Health {
    pub fn new(fingerprint: String) -> Health {
        Health {
            inner: Mutex::new(Inner {
                snapshot: Snapshot {
                    state: State::Unknown,
                    since: now_secs(),
                    cause: String::new(),
                },
                probe_label: None,
            }),
            probing: AtomicBool::new(false),
            fingerprint,
            store: OnceLock::new(),
        }
    }

    pub fn state(&self) -> State {
        self.inner
            .lock()
            .map_or(State::Unknown, |i| i.snapshot.state)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().map_or_else(
            |_| Snapshot {
                state: State::Unknown,
                since: 0,
                cause: String::new(),
            },
            |i| i.snapshot.clone(),
        )
    }

    pub(crate) fn probe_label(&self) -> Option<String> {
        self.inner.lock().ok().and_then(|i| i.probe_label.clone())
    }

    /// Records an exchange's outcome. Returns the new state if it changed.
    pub(crate) fn record(
        &self,
        upstream: &str,
        host: &str,
        outcome: &Outcome,
        label: Option<&str>,
    ) -> Option<State> {
        let (state, cause) = match outcome {
            Outcome::Answered => (State::Up, String::new()),
            Outcome::Away(c) => (State::Away, c.clone()),
            Outcome::Misconfigured(c) => (State::Misconfigured, c.clone()),
        };
        let snapshot = {
            let mut inner = self.inner.lock().ok()?;
            if state != State::Up {
                inner.probe_label = label.map(str::to_owned);
            }
            let same = inner.snapshot.state == state
                && (state != State::Misconfigured || inner.snapshot.cause == cause);
            if same {
                return None;
            }
            let previous = inner.snapshot.state;
            inner.snapshot = Snapshot {
                state,
                since: now_secs(),
                cause: cause.clone(),
            };
            match state {
                State::Misconfigured => tracing::error!(
                    upstream, host, %cause,
                    "the layer above is MISCONFIGURED for this layer: nothing is signed locally in its place; fix the configuration (this layer's upstream trust, URL or RA credential, or the upper layer's rule for it)"
                ),
                State::Away => tracing::warn!(
                    upstream, host, %cause,
                    "the layer above is away: auto labels sign locally and forward labels answer 503 at once, until a background probe reaches it"
                ),
                State::Up if previous != State::Unknown => {
                    tracing::info!(
                        upstream,
                        host,
                        was = previous.as_str(),
                        "the layer above answers again"
                    )
                }
                _ => tracing::debug!(upstream, host, "the layer above answers"),
            }
            inner.snapshot.clone()
        };
        self.persist(&snapshot);
        Some(state)
    }

    /// Keeps the state in `dir` from now on; takes the state kept there by an earlier run if
    /// it is for the same configuration and nothing was learned yet in this one. A kept `up`
    /// is not taken: reachability is only claimed after contact.
    pub(crate) fn keep_in(&self, dir: &Path, name: &str) {
        let path = dir.join(format!(
            "upstream-{}.health.json",
            super::store::file_key(name)
        ));
        if self.store.set(path.clone()).is_err() {
            return;
        }
        let Some(kept) = super::store::read::<Kept>(&path) else {
            return;
        };
        if kept.fingerprint != self.fingerprint || kept.snapshot.state == State::Up {
            return;
        }
        if let Ok(mut inner) = self.inner.lock() {
            if inner.snapshot.state == State::Unknown {
                inner.snapshot = kept.snapshot;
                inner.probe_label = kept.probe_label;
            }
        }
    }

    /// Takes over what `old` knew, if it watched the same upstream configuration.
    pub(crate) fn adopt(&self, old: &Health) {
        if old.fingerprint != self.fingerprint {
            return;
        }
        let (Ok(old), Ok(mut inner)) = (old.inner.lock(), self.inner.lock()) else {
            return;
        };
        inner.snapshot = old.snapshot.clone();
        inner.probe_label = old.probe_label.clone();
    }

    fn persist(&self, snapshot: &Snapshot) {
        let Some(path) = self.store.get().cloned() else {
            return;
        };
        let kept = Kept {
            fingerprint: self.fingerprint.clone(),
            snapshot: snapshot.clone(),
            probe_label: self.probe_label(),
        };
        super::store::write_soon(path, &kept);
    }

    /// Claims the probe; false if one is already running.
    pub(crate) fn start_probing(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn stop_probing(&self) {
        self.probing.store(false, Ordering::Release);
    }
}

/// What is kept on disk.
#[derive(Serialize, Deserialize)]
struct Kept {
    fingerprint: String,
    #[serde(flatten)]
    snapshot: Snapshot,
    #[serde(default)]
    probe_label: Option<String>,
}

/// Probes `upstream` in the background until it answers (or the runtime that holds it is
/// gone): `/cacerts` with pauses from [`FIRST_PROBE`] doubling to `max`.
pub(crate) fn spawn_probe(upstream: Weak<Upstream>, max: Duration) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        if let Some(u) = upstream.upgrade() {
            u.health.stop_probing();
        }
        return;
    };
    handle.spawn(async move {
        let mut pause = FIRST_PROBE.min(max);
        loop {
            tokio::time::sleep(pause).await;
            let Some(upstream) = upstream.upgrade() else {
                return;
            };
            let label = upstream.health.probe_label();
            // The probe's own result goes through `record` like any exchange.
            let _ = upstream.cacerts(label.as_deref()).await;
            if upstream.health.state() == State::Up {
                upstream.health.stop_probing();
                return;
            }
            pause = (pause * 2).min(max);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex as StdMutex};

    /// The log lines written while `f` runs (INFO and above, no ANSI, no time).
    fn logged(f: impl FnOnce()) -> String {
        crate::logging::tests::captured(tracing::Level::INFO, f)
    }

    #[test]
    fn states_have_their_reported_names() {
        assert_eq!(
            State::ALL.map(State::as_str),
            ["unknown", "up", "away", "misconfigured"]
        );
    }

    /// `since` is the wall clock's time of the change (Unix seconds), as reported in the
    /// twin and kept across restarts: the time a state began, from start and at each change.
    #[test]
    fn since_is_the_time_of_the_change() {
        let wall = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        let before = wall();
        let health = Health::new("p".into());
        let since = health.snapshot().since;
        assert!((before..=wall()).contains(&since), "{since}");
        let before = wall();
        health.record("p", "gw:1", &Outcome::Away("refused".into()), None);
        let since = health.snapshot().since;
        assert!((before..=wall()).contains(&since), "{since}");
    }

    /// `record` says when the state changed, and only then: a second failure of the same
    /// kind is no news (whatever its cause), a misconfiguration with a new cause is.
    #[test]
    fn a_state_changes_only_when_the_outcome_differs() {
        let health = Health::new("p".into());
        assert_eq!(health.state(), State::Unknown);
        let before = now_secs();
        let up = health.record("p", "gw:1", &Outcome::Answered, None);
        assert_eq!(up, Some(State::Up));
        assert_eq!(health.state(), State::Up);
        assert_eq!(health.record("p", "gw:1", &Outcome::Answered, None), None);
        let away = health.record("p", "gw:1", &Outcome::Away("refused".into()), None);
        assert_eq!(away, Some(State::Away));
        let snapshot = health.snapshot();
        assert_eq!(
            (snapshot.state, snapshot.cause.as_str()),
            (State::Away, "refused")
        );
        // `since` is the wall clock of the change, in seconds.
        assert!(
            snapshot.since >= before && snapshot.since <= now_secs(),
            "{snapshot:?}"
        );
        let again = health.record("p", "gw:1", &Outcome::Away("timed out".into()), None);
        assert_eq!(again, None, "away again, for another cause: no change");
        assert_eq!(health.snapshot().cause, "refused");
        let wrong = Outcome::Misconfigured("404".into());
        assert_eq!(
            health.record("p", "gw:1", &wrong, None),
            Some(State::Misconfigured)
        );
        assert_eq!(health.record("p", "gw:1", &wrong, None), None);
        let other = Outcome::Misconfigured("TLS certificate not trusted".into());
        assert_eq!(
            health.record("p", "gw:1", &other, None),
            Some(State::Misconfigured),
            "a new misconfiguration is news"
        );
        assert_eq!(health.snapshot().cause, "TLS certificate not trusted");
        assert_eq!(
            health.record("p", "gw:1", &Outcome::Answered, None),
            Some(State::Up)
        );
        assert_eq!(health.snapshot().cause, "");
    }

    /// The probe asks the `/cacerts` of the label whose request failed; an answer does not
    /// change which.
    #[test]
    fn the_probe_asks_the_label_that_failed() {
        let health = Health::new("p".into());
        assert_eq!(health.probe_label(), None);
        health.record("p", "gw:1", &Outcome::Away("refused".into()), Some("l2"));
        assert_eq!(health.probe_label().as_deref(), Some("l2"));
        health.record("p", "gw:1", &Outcome::Answered, Some("other"));
        assert_eq!(health.probe_label().as_deref(), Some("l2"));
        health.record("p", "gw:1", &Outcome::Misconfigured("404".into()), None);
        assert_eq!(health.probe_label(), None);
    }

    /// Each change is logged once, at its level: an error for a misconfiguration, a warning
    /// for an outage, news when the layer above answers again, nothing at INFO for the first
    /// contact.
    #[test]
    fn each_change_is_logged_once_at_its_level() {
        let health = Health::new("p".into());
        let text = logged(|| {
            health.record("p", "gw:1", &Outcome::Answered, None);
        });
        assert_eq!(text, "", "the first contact is no news");
        let text = logged(|| {
            health.record("p", "gw:1", &Outcome::Away("refused".into()), None);
            health.record("p", "gw:1", &Outcome::Away("refused".into()), None);
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("WARN") && text.contains("the layer above is away"),
            "{text}"
        );
        let text = logged(|| {
            health.record("p", "gw:1", &Outcome::Answered, None);
        });
        assert!(
            text.contains("INFO")
                && text.contains("answers again")
                && text.contains("was=\"away\""),
            "{text}"
        );
        let text = logged(|| {
            health.record("p", "gw:1", &Outcome::Misconfigured("404".into()), None);
        });
        assert!(
            text.contains("ERROR") && text.contains("MISCONFIGURED"),
            "{text}"
        );
    }

    /// A layer restarted during an outage knows at once: the state is kept on disk for the
    /// same configuration, and taken back only by it, only before anything is learned, and
    /// never as `up`.
    #[test]
    fn an_outage_is_kept_across_a_restart_for_the_same_configuration_only() {
        let dir = tempfile::tempdir().unwrap();
        let first = Health::new("p {url}".into());
        first.keep_in(dir.path(), "p");
        first.record("p", "gw:1", &Outcome::Away("refused".into()), Some("l2"));
        let kept = first.snapshot();

        let restarted = Health::new("p {url}".into());
        restarted.keep_in(dir.path(), "p");
        assert_eq!(restarted.snapshot(), kept);
        assert_eq!(restarted.probe_label().as_deref(), Some("l2"));

        let reconfigured = Health::new("p {other url}".into());
        reconfigured.keep_in(dir.path(), "p");
        assert_eq!(reconfigured.state(), State::Unknown);

        let learned = Health::new("p {url}".into());
        learned.record("p", "gw:1", &Outcome::Answered, None);
        learned.keep_in(dir.path(), "p");
        assert_eq!(learned.state(), State::Up, "what this run learned wins");

        // A kept `up` is not taken back: reachability is claimed only after contact.
        let up = Health::new("p {url}".into());
        up.keep_in(dir.path(), "p");
        up.record("p", "gw:1", &Outcome::Answered, None);
        let after_up = Health::new("p {url}".into());
        after_up.keep_in(dir.path(), "p");
        assert_eq!(after_up.state(), State::Unknown);
    }

    /// A reconfigured runtime takes over what its predecessor knew of the same upstream
    /// configuration, and nothing of another.
    #[test]
    fn a_reconfiguration_takes_over_the_health_of_the_same_upstream_only() {
        let old = Health::new("p {url}".into());
        old.record("p", "gw:1", &Outcome::Away("refused".into()), Some("l2"));
        let same = Health::new("p {url}".into());
        same.adopt(&old);
        assert_eq!(same.snapshot(), old.snapshot());
        assert_eq!(same.probe_label().as_deref(), Some("l2"));
        let other = Health::new("p {other url}".into());
        other.adopt(&old);
        assert_eq!(other.state(), State::Unknown);
    }

    #[test]
    fn one_probe_at_a_time() {
        let health = Health::new("p".into());
        assert!(health.start_probing());
        assert!(!health.start_probing(), "a second probe is refused");
        health.stop_probing();
        assert!(
            health.start_probing(),
            "after the first stops, a new one may start"
        );
    }

    /// While the layer above is away the probe keeps asking, one at a time, with pauses that
    /// double: against an upstream that accepts connections and never answers (each probe
    /// times out after the 1 s request timeout), the second probe comes at least 1 s + 1 s
    /// after the first, the third at least 1 s + 2 s after the second. Bounded by a deadline,
    /// so a probe that stops fails instead of hanging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_probe_keeps_asking_an_upstream_that_is_away_with_growing_pauses() {
        use std::sync::atomic::AtomicUsize;
        use std::time::Instant;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(StdMutex::new(Vec::<Instant>::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let silent = {
            let accepted = accepted.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((socket, _)) = listener.accept().await {
                    accepted.lock().unwrap().push(Instant::now());
                    count.fetch_add(1, Ordering::SeqCst);
                    held.push(socket);
                }
            })
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = crate::pki::ca_params("anchor", None, time::Duration::days(1))
            .self_signed(&key)
            .unwrap();
        let config: crate::config::UpstreamConfig = serde_json::from_value(serde_json::json!({
            "url": format!("https://127.0.0.1:{port}/.well-known/est"),
            "trust": [crate::config::PemSource(ca.pem())],
            "request_timeout_secs": 1,
            "probe_max_secs": 8,
        }))
        .unwrap();
        let upstream = Upstream::new("parent", &config, Path::new("."))
            .unwrap()
            .shared();
        upstream.health.record(
            "parent",
            &upstream.host,
            &Outcome::Away("refused".into()),
            None,
        );
        upstream.ensure_probing();
        assert!(!upstream.health.start_probing(), "the probe runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        while count.load(Ordering::SeqCst) < 3 {
            assert!(
                Instant::now() < deadline,
                "the probe stopped asking: {} probes in 30 s",
                count.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let at = accepted.lock().unwrap().clone();
        let (first, second) = (at[1] - at[0], at[2] - at[1]);
        assert!(first >= Duration::from_millis(1900), "{first:?}");
        assert!(second >= Duration::from_millis(2900), "{second:?}");
        assert_eq!(upstream.health.state(), State::Away);
        silent.abort();
    }
}
