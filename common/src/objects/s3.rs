//! Any S3-compatible server through aws-sdk-s3 (MinIO, s3s-fs, moto, AWS).
//!
//! Path-style addressing and "checksums only when required" are set because
//! the default CRC checksums and virtual-host buckets trip S3-compatible
//! servers. A PutObject is atomic by the S3 contract.

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};

use super::{ObjectError, ObjectStore, validate_key};

/// Where and how to reach the S3 server.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// Endpoint URL, e.g. `http://127.0.0.1:8014`.
    pub endpoint: String,
    /// Region name (any value for most S3-compatible servers).
    pub region: String,
    /// The bucket; created at start if missing.
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: SecretString,
}

/// S3 object store.
#[derive(Debug, Clone)]
pub struct S3ObjectStore {
    client: aws_sdk_s3::Client,
    bucket: String,
}

fn backend(op: &'static str, key: &str, e: impl std::fmt::Debug) -> ObjectError {
    // The SDK's Display is terse ("service error"); Debug names the cause.
    let message = format!("{e:?}");
    ObjectError::Backend {
        op,
        key: key.to_owned(),
        message: message.chars().take(400).collect(),
    }
}

impl S3ObjectStore {
    /// Builds the client and creates the bucket if it does not exist.
    pub async fn connect(settings: &S3Settings) -> Result<Self, ObjectError> {
        let credentials = Credentials::new(
            &settings.access_key,
            settings.secret_key.expose_secret(),
            None,
            None,
            "cardpipe-config",
        );
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&settings.endpoint)
            .region(Region::new(settings.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let store = Self {
            client: aws_sdk_s3::Client::from_conf(config),
            bucket: settings.bucket.clone(),
        };
        store.ensure_bucket().await?;
        Ok(store)
    }

    async fn ensure_bucket(&self) -> Result<(), ObjectError> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                // Another replica may have created it meanwhile.
                if self
                    .client
                    .head_bucket()
                    .bucket(&self.bucket)
                    .send()
                    .await
                    .is_ok()
                {
                    Ok(())
                } else {
                    Err(backend("create_bucket", &self.bucket, e))
                }
            }
        }
    }
}

#[async_trait]
impl ObjectStore for S3ObjectStore {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn put(&self, key: &str, bytes: Bytes) -> Result<(), ObjectError> {
        validate_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| backend("put", key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ObjectError> {
        validate_key(key)?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                let data = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| backend("get", key, e))?;
                Ok(Some(data.into_bytes()))
            }
            Err(e) => {
                if e.as_service_error().is_some_and(|s| s.is_no_such_key()) {
                    Ok(None)
                } else {
                    Err(backend("get", key, e))
                }
            }
        }
    }

    async fn get_bounded(&self, key: &str, max: u64) -> Result<Option<Bytes>, ObjectError> {
        validate_key(key)?;
        // A ranged GET of the first max + 1 bytes: the server sends no more than that, and the
        // object's full length comes back in Content-Range.
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes=0-{max}"))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Ok(None);
            }
            // An empty object answers a ranged GET with 416 on some servers.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                return Ok(Some(Bytes::new()));
            }
            Err(e) => return Err(backend("get", key, e)),
        };
        let total = out
            .content_range()
            .and_then(|r| r.rsplit('/').next())
            .and_then(|n| n.parse::<u64>().ok());
        let data = out
            .body
            .collect()
            .await
            .map_err(|e| backend("get", key, e))?
            .into_bytes();
        if total.is_some_and(|t| t > max) || data.len() as u64 > max {
            return Err(ObjectError::TooLarge {
                key: key.to_owned(),
                max,
            });
        }
        Ok(Some(data))
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        validate_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| backend("delete", key, e))?;
        // On a versioned bucket the delete above only adds a delete marker: every version
        // (personal data, wrapped keys) is removed too. A server without versioning support
        // answers the listing with an error or with no versions; the plain delete stands.
        let Ok(versions) = self
            .client
            .list_object_versions()
            .bucket(&self.bucket)
            .prefix(key)
            .send()
            .await
        else {
            return Ok(());
        };
        let ids = versions
            .versions()
            .iter()
            .filter(|v| v.key() == Some(key))
            .filter_map(|v| v.version_id())
            .chain(
                versions
                    .delete_markers()
                    .iter()
                    .filter(|m| m.key() == Some(key))
                    .filter_map(|m| m.version_id()),
            )
            .filter(|id| *id != "null")
            .map(str::to_owned)
            .collect::<Vec<_>>();
        for id in ids {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .version_id(&id)
                .send()
                .await
                .map_err(|e| backend("delete", key, e))?;
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, ObjectError> {
        // Walked level by level with a "/" delimiter, as a directory tree: the same keys as
        // one flat listing of the prefix, but a server that keeps objects as files (the
        // s3s-fs server, a filesystem gateway) then reads only the directories under the
        // prefix instead of every object of the bucket. The keys stage lists one
        // application's objects after every QC pass; listed flat, s3s-fs spent a whole core
        // walking the bucket during a 2,000-application distributed run.
        let mut keys = Vec::new();
        let mut levels = vec![prefix.to_owned()];
        while let Some(level) = levels.pop() {
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&level)
                .delimiter("/")
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| backend("list", prefix, e))?;
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
                levels.extend(
                    page.common_prefixes()
                        .iter()
                        .filter_map(|p| p.prefix().map(str::to_owned)),
                );
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn ping(&self) -> Result<(), ObjectError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| backend("ping", &self.bucket, e))
    }
}
