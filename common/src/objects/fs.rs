//! Objects as files under a root directory (embedded mode).
//!
//! A write goes to a temporary file in `<root>/.tmp`, is flushed to disk, then
//! renamed over the target: rename is atomic on one filesystem, so a reader
//! never sees half an object, and a crash leaves at most a stray temp file.
//! Several processes may share one root (a shared filesystem): at start a
//! process removes only temp files older than [`STALE_TEMP`], never a write
//! another process has in flight.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::AsyncWriteExt;

use super::{ObjectError, ObjectStore, validate_key};

/// Filesystem object store.
#[derive(Debug, Clone)]
pub struct FsObjectStore {
    root: PathBuf,
}

fn backend(op: &'static str, key: &str, e: impl std::fmt::Display) -> ObjectError {
    ObjectError::Backend {
        op,
        key: key.to_owned(),
        message: e.to_string(),
    }
}

/// Age after which a temp file is a crash's leftover, not a write in flight (a write
/// takes far less: it is one object, flushed and renamed).
pub const STALE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

impl FsObjectStore {
    /// Opens (creating) a store rooted at `root`, removing temp files a crash
    /// left (older than [`STALE_TEMP`]; younger ones may be another process's
    /// writes in flight).
    pub async fn open(root: impl AsRef<Path>) -> Result<Self, ObjectError> {
        let root = root.as_ref().to_path_buf();
        let tmp = root.join(".tmp");
        tokio::fs::create_dir_all(&tmp)
            .await
            .map_err(|e| backend("open", "", e))?;
        let sweep = tmp.clone();
        tokio::task::spawn_blocking(move || remove_stale_temp_files(&sweep, STALE_TEMP))
            .await
            .map_err(|e| backend("open", "", e))?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf, ObjectError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

#[async_trait]
impl ObjectStore for FsObjectStore {
    fn kind(&self) -> &'static str {
        "fs"
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        let path = self.path(key)?;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| backend("put", key, e))?;
        }
        let tmp = self
            .root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().to_string());
        let write = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            file.write_all(&bytes).await?;
            file.sync_all().await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(e) = write.await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(backend("put", key, e));
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        match tokio::fs::read(self.path(key)?).await {
            Ok(data) => Ok(Some(Bytes::from(data))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend("get", key, e)),
        }
    }

    async fn get_bounded(&self, key: &str, max: u64) -> Result<Option<Bytes>, ObjectError> {
        use tokio::io::AsyncReadExt;
        let file = match tokio::fs::File::open(self.path(key)?).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(backend("get", key, e)),
        };
        // Read at most max + 1 bytes: the file may grow between a size check and the read.
        let mut data = Vec::new();
        file.take(max.saturating_add(1))
            .read_to_end(&mut data)
            .await
            .map_err(|e| backend("get", key, e))?;
        if data.len() as u64 > max {
            return Err(ObjectError::TooLarge {
                key: key.to_owned(),
                max,
            });
        }
        Ok(Some(Bytes::from(data)))
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend("delete", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ObjectError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            // Walk only the directory the prefix names (`applications/<id>/` for
            // `applications/<id>/credentials-`), not the whole tree: listing one
            // application's objects must not cost more as the store grows.
            let start = match prefix.rfind('/') {
                Some(i)
                    if !prefix[..i]
                        .split('/')
                        .any(|p| p.is_empty() || p == "." || p == "..") =>
                {
                    root.join(&prefix[..i])
                }
                _ => root.clone(),
            };
            let mut stack = vec![start];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(backend("list", &prefix, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| backend("list", &prefix, e))?;
                    let path = entry.path();
                    let rel = path
                        .strip_prefix(&root)
                        .unwrap_or(&path)
                        .to_string_lossy()
                        .into_owned();
                    if rel == ".tmp" {
                        continue;
                    }
                    if path.is_dir() {
                        stack.push(path);
                    } else if rel.starts_with(&prefix) {
                        keys.push(rel);
                    }
                }
            }
            keys.sort();
            Ok(keys)
        })
        .await
        .map_err(|e| backend("list", "", e))?
    }

    async fn ping(&self) -> Result<(), ObjectError> {
        tokio::fs::metadata(&self.root)
            .await
            .map(|_| ())
            .map_err(|e| backend("ping", "", e))
    }
}

/// Removes files in `dir` last modified more than `age` ago (best effort: a file
/// another process renames away meanwhile is simply gone).
fn remove_stale_temp_files(dir: &Path, age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|at| now.duration_since(at).ok())
            .is_some_and(|elapsed| elapsed > age);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second process opening the same root leaves the first one's writes in
    /// flight alone; only old leftovers are swept.
    #[tokio::test]
    async fn opening_a_shared_root_keeps_writes_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FsObjectStore::open(dir.path()).await.expect("open");
        let in_flight = dir.path().join(".tmp").join("in-flight");
        std::fs::write(&in_flight, b"half an object").expect("temp");
        let leftover = dir.path().join(".tmp").join("leftover");
        std::fs::write(&leftover, b"crash").expect("temp");
        let old = std::time::SystemTime::now() - STALE_TEMP - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&leftover)
            .and_then(|f| f.set_modified(old))
            .expect("age it");
        let _second = FsObjectStore::open(dir.path()).await.expect("open again");
        assert!(
            in_flight.exists(),
            "another process's write in flight was removed"
        );
        assert!(!leftover.exists(), "a crash's leftover was kept");
        store
            .put("a/b/one", Bytes::from_static(b"1"))
            .await
            .expect("put");
        assert_eq!(
            store.list("a/b/").await.expect("list"),
            vec!["a/b/one".to_owned()]
        );
    }

    /// Listing by prefix walks only the named directory, and still matches partial
    /// names in it and nested keys below it.
    #[tokio::test]
    async fn list_by_prefix_walks_only_the_prefix_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FsObjectStore::open(dir.path()).await.expect("open");
        for key in [
            "applications/A1/credentials-1.json",
            "applications/A1/credentials-2.json",
            "applications/A1/qc-1.json",
            "applications/A1/sub/credentials-x",
            "applications/A10/credentials-1.json",
            "other/credentials-1.json",
        ] {
            store.put(key, Bytes::from_static(b"x")).await.expect("put");
        }
        assert_eq!(
            store
                .list("applications/A1/credentials-")
                .await
                .expect("list"),
            vec![
                "applications/A1/credentials-1.json".to_owned(),
                "applications/A1/credentials-2.json".to_owned()
            ]
        );
        assert_eq!(store.list("applications/A1").await.expect("list").len(), 5);
        assert_eq!(store.list("").await.expect("list").len(), 6);
        assert!(store.list("missing/dir/x").await.expect("list").is_empty());
        // Nested keys below the prefix directory are found too.
        assert_eq!(store.list("applications/A1/").await.expect("list").len(), 4);
    }
}
