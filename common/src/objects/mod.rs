//! Artifact storage (photos, templates, wrapped keys, certificates, reports,
//! manifests, CRLs) behind a small trait.
//!
//! Two backends share one contract (see `tests/object_store_contract.rs`):
//! the local filesystem ([`fs::FsObjectStore`], embedded mode) and any
//! S3-compatible server ([`s3::S3ObjectStore`]). Writes are atomic in both: a
//! reader sees the whole object or none of it.

pub mod fs;
pub mod s3;

use async_trait::async_trait;
use bytes::Bytes;

/// Object store failures. Keys are ours (ids and kinds), never personal data.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The key is not a valid cardpipe object key.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The backend failed.
    #[error("object store {op} {key:?}: {message}")]
    Backend {
        /// The operation (`put`, `get`, ...).
        op: &'static str,
        /// The key.
        key: String,
        /// The backend's message.
        message: String,
    },
    /// The object is larger than the reader accepts ([`ObjectStore::get_bounded`]); nothing
    /// past the bound was read.
    #[error("object {key:?} is larger than {max} bytes")]
    TooLarge {
        /// The key.
        key: String,
        /// The bound.
        max: u64,
    },
}

/// The object store contract every backend meets.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Backend name (`fs`, `s3`).
    fn kind(&self) -> &'static str;
    /// Writes an object atomically, replacing any previous one.
    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError>;
    /// Reads an object; `None` when absent.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError>;
    /// Reads an object of at most `max` bytes; a larger one is [`ObjectError::TooLarge`]
    /// without being read whole (untrusted keys, e.g. a registry's artifact references,
    /// must not make the process hold an object of any size). The default reads the object
    /// and checks its length: backends override it to check the size first.
    async fn get_bounded(&self, key: &str, max: u64) -> Result<Option<Bytes>, ObjectError> {
        match self.get(key).await? {
            Some(b) if b.len() as u64 > max => Err(ObjectError::TooLarge {
                key: key.to_owned(),
                max,
            }),
            other => Ok(other),
        }
    }
    /// Deletes an object (absent is fine).
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
    /// Keys under a prefix, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, ObjectError>;
    /// Answers when the store is reachable.
    async fn ping(&self) -> Result<(), ObjectError>;
}

/// Checks an object key: relative, `/`-separated segments of
/// `[A-Za-z0-9._=-]`, no empty, `.` or `..` segment, at most 512 bytes.
pub fn validate_key(key: &str) -> Result<(), ObjectError> {
    let bad = |reason| {
        Err(ObjectError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() || key.len() > 512 {
        return bad("must be 1..=512 bytes");
    }
    for segment in key.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return bad("empty, '.' or '..' path segment");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._=-".contains(&b))
        {
            return bad("only A-Z a-z 0-9 . _ = - and '/' are allowed");
        }
        if segment.starts_with(".tmp") {
            return bad("'.tmp' segments are reserved");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate_key;

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("applications/0192/photo.jpg.enc").is_ok());
        for bad in [
            "", "/abs", "a//b", "a/../b", "a b", "a/./b", "x/.tmp-1", "é",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
