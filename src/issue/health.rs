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
