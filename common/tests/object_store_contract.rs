//! One object store contract, run against the filesystem and S3.

use std::sync::Arc;

use bytes::Bytes;
use cardpipe_common::objects::ObjectStore;
use cardpipe_common::objects::fs::FsObjectStore;
use cardpipe_common::testing;

async fn round_trip(store: Arc<dyn ObjectStore>) {
    store.ping().await.expect("ping");
    assert_eq!(store.get("a/missing.bin").await.expect("get"), None);
    store
        .put("apps/1/photo.jpg.enc", Bytes::from_static(b"one"))
        .await
        .expect("put");
    store
        .put("apps/1/dg1.bin", Bytes::from_static(b"two"))
        .await
        .expect("put");
    store
        .put("apps/2/photo.jpg.enc", Bytes::from_static(b"three"))
        .await
        .expect("put");
    assert_eq!(
        store
            .get("apps/1/photo.jpg.enc")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"one"[..])
    );
    store
        .put("apps/1/photo.jpg.enc", Bytes::from_static(b"replaced"))
        .await
        .expect("overwrite");
    assert_eq!(
        store
            .get("apps/1/photo.jpg.enc")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"replaced"[..])
    );
    assert_eq!(
        store.list("apps/1/").await.expect("list"),
        vec![
            "apps/1/dg1.bin".to_owned(),
            "apps/1/photo.jpg.enc".to_owned()
        ]
    );
    store.delete("apps/1/dg1.bin").await.expect("delete");
    store
        .delete("apps/1/dg1.bin")
        .await
        .expect("deleting twice is fine");
    assert_eq!(store.get("apps/1/dg1.bin").await.expect("get"), None);
    assert_eq!(store.list("apps/").await.expect("list").len(), 2);

    // Listing is recursive whatever the depth, and a prefix need not end at a "/".
    for key in [
        "deep/a/b/c.bin",
        "deep/a/d.bin",
        "deep/ab/e.bin",
        "deep/f.bin",
    ] {
        store.put(key, Bytes::from_static(b"x")).await.expect("put");
    }
    assert_eq!(
        store.list("deep/").await.expect("list"),
        [
            "deep/a/b/c.bin",
            "deep/a/d.bin",
            "deep/ab/e.bin",
            "deep/f.bin"
        ]
    );
    assert_eq!(
        store.list("deep/a").await.expect("list"),
        ["deep/a/b/c.bin", "deep/a/d.bin", "deep/ab/e.bin"]
    );
    assert_eq!(
        store.list("deep/a/").await.expect("list"),
        ["deep/a/b/c.bin", "deep/a/d.bin"]
    );
    assert!(store.list("deep/z").await.expect("list").is_empty());
}

async fn bad_keys_are_refused(store: Arc<dyn ObjectStore>) {
    for key in ["../etc/passwd", "/abs", "a//b", "sp ace"] {
        let err = store
            .put(key, Bytes::from_static(b"x"))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("invalid object key"), "{err}");
    }
}

/// Readers racing a writer see a whole old or a whole new object, never a mix.
async fn writes_are_atomic(store: Arc<dyn ObjectStore>) {
    let a = Bytes::from(vec![b'a'; 3 * 1024 * 1024]);
    let b = Bytes::from(vec![b'b'; 3 * 1024 * 1024]);
    store.put("big/object", a.clone()).await.expect("put a");
    let writer = {
        let store = store.clone();
        let (a, b) = (a.clone(), b.clone());
        tokio::spawn(async move {
            for i in 0..6 {
                let data = if i % 2 == 0 { b.clone() } else { a.clone() };
                store.put("big/object", data).await.expect("put");
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads < 3 {
        let got = store
            .get("big/object")
            .await
            .expect("get")
            .expect("present");
        assert!(
            got == a || got == b,
            "a reader saw a partial object of {} bytes",
            got.len()
        );
        reads += 1;
    }
    writer.await.expect("writer");
}

/// A bounded read returns objects up to the bound and refuses a larger one by name, without
/// handing back its bytes; an absent object is `None`, an empty one is empty.
async fn bounded_reads(store: Arc<dyn ObjectStore>) {
    let prefix = format!("bounded/{}", uuid::Uuid::new_v4().simple());
    let key = format!("{prefix}/photo");
    let body = Bytes::from(vec![7u8; 10_000]);
    store.put(&key, body.clone()).await.expect("put");
    assert_eq!(
        store.get_bounded(&key, 10_000).await.expect("at the bound"),
        Some(body.clone())
    );
    assert_eq!(
        store
            .get_bounded(&key, 50_000)
            .await
            .expect("under the bound"),
        Some(body)
    );
    let err = store
        .get_bounded(&key, 9_999)
        .await
        .expect_err("over the bound");
    assert!(
        matches!(
            err,
            cardpipe_common::objects::ObjectError::TooLarge { max: 9_999, .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("larger than 9999 bytes"), "{err}");
    assert_eq!(
        store
            .get_bounded(&format!("{prefix}/absent"), 10)
            .await
            .expect("absent"),
        None
    );
    let empty = format!("{prefix}/empty");
    store.put(&empty, Bytes::new()).await.expect("put empty");
    assert_eq!(
        store.get_bounded(&empty, 10).await.expect("empty"),
        Some(Bytes::new())
    );
}

macro_rules! contract {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[tokio::test]
            async fn round_trip() {
                let (store, _guard) = $make;
                super::round_trip(store).await
            }
            #[tokio::test]
            async fn bad_keys_are_refused() {
                let (store, _guard) = $make;
                super::bad_keys_are_refused(store).await
            }
            #[tokio::test]
            async fn bounded_reads() {
                let (store, _guard) = $make;
                super::bounded_reads(store).await
            }
            #[tokio::test]
            async fn writes_are_atomic() {
                let (store, _guard) = $make;
                super::writes_are_atomic(store).await
            }
        }
    };
}

async fn fs_store() -> (Arc<dyn ObjectStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    (
        Arc::new(FsObjectStore::open(dir.path()).await.expect("open")),
        dir,
    )
}

contract!(fs, fs_store().await);
contract!(
    s3,
    (
        Arc::new(testing::s3_store().await) as Arc<dyn ObjectStore>,
        ()
    )
);
