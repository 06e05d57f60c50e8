//! Objects as files under a root directory (embedded mode).
//!
//! A write goes to a temporary file in `<root>/.tmp`, is flushed to disk, then
//! renamed over the target: rename is atomic on one filesystem, so a reader
//! never sees half an object, and a crash leaves at most a stray temp file
//! (cleaned at start).

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

impl FsObjectStore {
    /// Opens (creating) a store rooted at `root`, removing temp files a crash
    /// may have left.
    pub async fn open(root: impl AsRef<Path>) -> Result<Self, ObjectError> {
        let root = root.as_ref().to_path_buf();
        let tmp = root.join(".tmp");
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        tokio::fs::create_dir_all(&tmp)
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
            let mut stack = vec![root.clone()];
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
