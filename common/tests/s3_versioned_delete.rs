//! On a versioned bucket (deploy/compose.yaml turns versioning on) a plain DELETE only adds a
//! delete marker and every earlier version — a sealed card package, a manifest — stays
//! readable. `S3ObjectStore::delete` removes every version of the key and its delete markers,
//! and nothing of other keys. Against a real S3 server with versioning (moto's server, started
//! by tests/services.sh; s3s-fs has no versioning).

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::types::{BucketVersioningStatus, VersioningConfiguration};
use bytes::Bytes;
use cardpipe_common::objects::ObjectStore;
use cardpipe_common::objects::s3::{S3ObjectStore, S3Settings};
use cardpipe_common::testing;

fn endpoint() -> String {
    std::env::var("CARDPIPE_TEST_S3_VERSIONED_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:8015".to_owned())
}

fn raw_client() -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIATEST",
            "secrettest",
            None,
            None,
            "test",
        ))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// (versions, delete markers) stored under exactly `key`.
async fn versions_of(client: &aws_sdk_s3::Client, bucket: &str, key: &str) -> (usize, usize) {
    let listed = client
        .list_object_versions()
        .bucket(bucket)
        .prefix(key)
        .send()
        .await
        .expect("listing versions");
    (
        listed
            .versions()
            .iter()
            .filter(|v| v.key() == Some(key))
            .count(),
        listed
            .delete_markers()
            .iter()
            .filter(|m| m.key() == Some(key))
            .count(),
    )
}

#[tokio::test]
async fn deleting_removes_every_version_on_a_versioned_bucket() {
    let bucket = testing::unique("cardpipe-versioned-");
    let store = S3ObjectStore::connect(&S3Settings {
        endpoint: endpoint(),
        region: "us-east-1".into(),
        bucket: bucket.clone(),
        access_key: "AKIATEST".into(),
        secret_key: "secrettest".into(),
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the versioned S3 server is required for this test (tests/services.sh starts moto on {}): {e}",
            endpoint()
        )
    });
    let client = raw_client();
    client
        .put_bucket_versioning()
        .bucket(&bucket)
        .versioning_configuration(
            VersioningConfiguration::builder()
                .status(BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();

    let key = "applications/A1/credentials-1-00AB.sealed";
    let neighbour = "applications/A1/credentials-1-00AB.sealed-other";
    for body in ["first attempt", "retry overwrote it", "and again"] {
        store.put(key, Bytes::from(body)).await.unwrap();
    }
    store.put(neighbour, Bytes::from("keep")).await.unwrap();
    assert_eq!(versions_of(&client, &bucket, key).await, (3, 0));

    store.delete(key).await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), None);
    assert_eq!(
        versions_of(&client, &bucket, key).await,
        (0, 0),
        "no version and no delete marker left"
    );
    assert_eq!(
        store.get(neighbour).await.unwrap(),
        Some(Bytes::from("keep")),
        "another key sharing the prefix is untouched"
    );
    assert_eq!(versions_of(&client, &bucket, neighbour).await, (1, 0));
    // Deleting what is gone is fine.
    store.delete(key).await.unwrap();
    assert_eq!(versions_of(&client, &bucket, key).await, (0, 0));
}
