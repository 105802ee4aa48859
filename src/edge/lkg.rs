//! The last-known-good configuration: every desired document the module accepted, kept on the
//! data volume so that a module restarted while edgeHub or the cloud is away serves at once.
//! Written atomically (temporary file, fsync, rename, fsync of the directory).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

pub const FILE_NAME: &str = "edge-est-desired.json";

#[derive(Clone, Debug)]
pub struct LastKnownGood {
    path: PathBuf,
}

impl LastKnownGood {
    pub fn new(data_dir: &Path) -> LastKnownGood {
        LastKnownGood {
            path: data_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Persists `desired` (with its `$version`); on return it is on disk.
    pub fn save(&self, desired: &Value) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(desired)?;
        write_atomically(&self.path, &text, 0o600)
    }

    /// The last accepted desired document, if any. A file that does not parse is reported as
    /// an error, not silently ignored.
    pub fn load(&self) -> std::io::Result<Option<Value>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Writes `bytes` to `path` so that a reader sees either the old or the new content, never a
/// mix, and the new content survives a crash once this returns. The file gets `mode`.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        let mut file = options.open(&temp)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn saves_and_loads_atomically_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let lkg = LastKnownGood::new(dir.path());
        assert!(lkg.load().unwrap().is_none());
        lkg.save(&json!({"$version": 3, "labels": []})).unwrap();
        lkg.save(&json!({"$version": 4, "labels": []})).unwrap();
        assert_eq!(
            lkg.load().unwrap(),
            Some(json!({"$version": 4, "labels": []}))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(lkg.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::write(lkg.path(), b"{torn").unwrap();
        assert!(lkg.load().is_err());
    }
}
