//! What this layer keeps about its upstreams across restarts, next to the journal: each
//! upstream's CA chain (`/cacerts`) and its last known health. Each is one small JSON file,
//! written atomically (temporary file, fsync, rename, fsync of the directory), so a layer
//! restarted during an outage still serves `/cacerts` and authenticates certificates issued
//! above.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A file name part for `name`: its readable characters, then a hash of the whole.
pub fn file_key(name: &str) -> String {
    let readable: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(32)
        .collect();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes());
    let hash: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{readable}-{hash}")
}

/// Reads a kept file; `None` if there is none or it cannot be used (a warning says why).
pub fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "kept upstream state unreadable; ignored");
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "kept upstream state malformed; ignored");
            None
        }
    }
}

fn write_bytes(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(text)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// Writes `value` to `path` atomically off the async workers (inline without a runtime);
/// a failure is logged, never fatal: the state is only a head start for the next run.
pub fn write_soon<T: Serialize>(path: PathBuf, value: &T) {
    let text = match serde_json::to_vec_pretty(value) {
        Ok(text) => text,
        Err(_) => return,
    };
    let job = move || {
        if let Err(e) = write_bytes(&path, &text) {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep upstream state on disk");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(job);
        }
        Err(_) => job(),
    }
}
