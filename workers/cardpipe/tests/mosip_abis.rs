//! The MOSIP ABIS API as MOSIP drives it: `cardpipe abis serve` answering the messages of
//! MOSIP's ABIS API specification (0.9, the recorded request examples, verbatim apart from
//! the data share host and the reference ids of later steps), with biometrics fetched from a
//! MOSIP side played by this test — AuthN (`clientidsecretkey`, JWT as the `Authorization`
//! cookie) and a data share serving CBEFF XML of real FVC2002 ISO/IEC 19794-2 templates.
//!
//! Over HTTP on the embedded store (SQLite), and over a RabbitMQ queue pair on PostgreSQL;
//! both restart the process and find the gallery and the recorded answers again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cardpipe_biometrics::matcher::PositionedTemplate;
use cardpipe_dedup::mosip::cbeff;
use serde_json::{Value, json};

mod common;

use common::{Running, free_port};

const TOKEN: &str = "mosip-regproc-abis-token-0123456789";
const JWT: &str = "eyJhbGciOiJSUzI1NiJ9.test-session.signature";

// The spec's examples.
const SPEC_INSERT: &str = r#"{
  "id": "mosip.abis.insert",
  "version": "1.1",
  "requestId": "91234567-89AB-CDEF-0123-456789ABCDEF",
  "requesttime": "2020-03-29T07:01:24.692Z",
  "referenceId": "01234567-89AB-CDEF-0123-456789ABCDEF",
  "referenceURL": "https://{base_url}/v1/datashare/get/mpolicy-default-abis/mpartner-default-abis/mpartner-default-abismpolicy-default-abis20210205062412BlQo0rJB"
}"#;
const SPEC_IDENTIFY: &str = r#"{
  "id": "mosip.abis.identify",
  "version": "1.1",
  "requestId": "01234567-89AB-CDEF-0123-456789ABCDEF",
  "requesttime": "2020-03-29T07:01:24.692Z",
  "referenceId": "987654321-89AB-CDEF-0123-456789ABCDEF",
  "referenceURL": "",
  "flags": {
    "maxResults": "10",
    "targetFPIR": "30",
    "flag1": "value1",
    "flag2": "value2"
  },
  "gallery": {
    "referenceIds": [
      { "referenceId": "2abe7b7d-b58a-4466-a006-c79297281123" },
      { "referenceId": "7acce7b7d-b58a-4466-a006-c79297281456" },
      { "referenceId": "3bce7b7d-b58a-4466-a006-c79297281678" },
      { "referenceId": "5cce7b7d-b58a-4466-a006-c79297281098" },
      { "referenceId": "2cce7b7d-b58a-4466-a006-c79297281321" }
    ]
  }
}"#;
const SPEC_DELETE: &str = r#"{
  "id": "mosip.abis.delete",
  "version": "1.1",
  "requestId": "01234567-89AB-CDEF-0123-456789ABCDEF",
  "requesttime": "2020-03-29T07:01:24.692Z",
  "referenceId": "7acce7b7d-b58a-4466-a006-c79297281456"
}"#;
const SPEC_PING: &str = r#"{
  "id": "mosip.abis.ping",
  "version": "1.1",
  "requestId": "01234567-89AB-CDEF-0123-456789ABCDEF",
  "requesttime": "2020-03-29T07:01:24.692Z"
}"#;
const SPEC_PENDING: &str = r#"{
  "id": "mosip.abis.pendingJobs",
  "version": "1.1",
  "requestId": "01234567-89AB-CDEF-0123-456789ABCDEF",
  "requesttime": "2020-03-29T07:01:24.692Z"
}"#;
const SPEC_COUNT: &str = r#"{
  "id": "mosip.abis.referenceCount",
  "version": "1.1",
  "requestId": "01234567-89AB-CDEF-0123-456789ABCDEF",
  "requesttime": "2020-03-29T07:01:24.692Z"
}"#;

/// Reference ids: A and C are two impressions of one person (FVC2002 DB1), B another person.
const A: &str = "01234567-89AB-CDEF-0123-456789ABCDEF";
const B: &str = "2abe7b7d-b58a-4466-a006-c79297281123";
const C: &str = "987654321-89AB-CDEF-0123-456789ABCDEF";

fn shared_data() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("../shared/data/fvc2002-iso");
    assert!(
        dir.is_dir(),
        "shared FVC2002 templates not found at {}",
        dir.display()
    );
    dir
}

/// A ten-print: the ten FVC fingers 101..110 of database `db`, impression `k`, as positions
/// 1..10 (the records say position 0, as a capture station writes them).
fn tenprint(db: u8, k: u8) -> Vec<PositionedTemplate> {
    (1..=10u8)
        .map(|p| PositionedTemplate {
            position: p,
            record: std::fs::read(
                shared_data()
                    .join(format!("DB{db}_B"))
                    .join(format!("{}_{k}.iso", 100 + u16::from(p))),
            )
            .expect("FVC template"),
        })
        .collect()
}

/// MOSIP's side: AuthN and the data share.
#[derive(Clone, Default)]
struct Mosip {
    shares: Arc<Mutex<HashMap<String, String>>>,
    logins: Arc<Mutex<usize>>,
}

async fn authenticate(State(m): State<Mosip>, Json(body): Json<Value>) -> Response {
    let r = &body["request"];
    if r["clientId"] == "mosip-abis-client"
        && r["secretKey"] == "abis-secret"
        && r["appId"] == "regproc"
    {
        *m.logins.lock().unwrap() += 1;
        (
            [(header::SET_COOKIE, format!("Authorization={JWT}; Max-Age=1800; Path=/; HttpOnly"))],
            Json(json!({"id": "string", "version": "string", "responsetime": "2021-02-05T06:31:36.885Z",
                        "metadata": null, "response": {"status": "Success",
                        "message": "Clientid and Token combination had been validated successfully"},
                        "errors": null})),
        )
            .into_response()
    } else {
        Json(json!({"errors": [{"errorCode": "KER-ATH-401", "message": "Authentication Failed"}]}))
            .into_response()
    }
}

async fn datashare(
    State(m): State<Mosip>,
    UrlPath(share): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let authorised = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| {
            c.split(';')
                .any(|kv| kv.trim() == format!("Authorization={JWT}"))
        });
    // MOSIP answers functional failures with HTTP 200 and an errors list.
    if !authorised {
        return Json(
            json!({"id": null, "version": null, "responsetime": "2021-02-05T06:29:48.257Z",
            "metadata": null, "response": null,
            "errors": [{"errorCode": "KER-ATH-401", "message": "Authentication Failed"}]}),
        )
        .into_response();
    }
    match share.as_str() {
        "expired" => Json(json!({"errors": [{"errorCode": "DAT-SER-006", "message": "Data share usage expired"}]}))
            .into_response(),
        s => match m.shares.lock().unwrap().get(s) {
            Some(xml) => ([(header::CONTENT_TYPE, "application/xml")], xml.clone()).into_response(),
            None => Json(json!({"errors": [{"errorCode": "DAT-SER-006", "message": "Data share not found"}]}))
                .into_response(),
        },
    }
}

async fn start_mosip() -> (String, Mosip) {
    let mosip = Mosip::default();
    {
        let mut shares = mosip.shares.lock().unwrap();
        shares.insert("share-a".into(), cbeff::document(&tenprint(1, 1)));
        shares.insert("share-b".into(), cbeff::document(&tenprint(2, 1)));
        shares.insert("share-c".into(), cbeff::document(&tenprint(1, 2)));
        // Finger images only (ISO/IEC 19794-4), and an iris only.
        shares.insert(
            "share-images".into(),
            "<BIR><BIR><BDBInfo><Type>Finger</Type><Subtype>Left Thumb</Subtype></BDBInfo><BDB>RklSADAyMAA=</BDB></BIR></BIR>".into(),
        );
        shares.insert(
            "share-iris".into(),
            "<BIR><BIR><BDBInfo><Type>Iris</Type><Subtype>Left</Subtype></BDBInfo><BDB>SUlSADAyMAA=</BDB></BIR></BIR>".into(),
        );
    }
    let app = axum::Router::new()
        .route(
            "/v1/authmanager/authenticate/clientidsecretkey",
            post(authenticate),
        )
        .route(
            "/v1/datashare/get/mpolicy-default-abis/mpartner-default-abis/{share}",
            get(datashare),
        )
        .with_state(mosip.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, mosip)
}

fn config(mosip: &str, extra: &str) -> String {
    format!(
        "[[abis.clients]]\nname = \"mosip-regproc\"\ntoken_sha256 = \"{}\"\n\
         [abis.datashare]\nauth_url = \"http://{mosip}/v1/authmanager/authenticate/clientidsecretkey\"\n\
         client_id = \"mosip-abis-client\"\nsecret_key = \"abis-secret\"\napp_id = \"regproc\"\n{extra}",
        cardpipe_registry::config::hash_token(TOKEN)
    )
}

/// A spec message with its referenceURL on our data share, other ids and fields changed.
fn message(spec: &str, mosip: &str, changes: &[(&str, Value)]) -> Value {
    let mut v: Value =
        serde_json::from_str(&spec.replace("https://{base_url}", &format!("http://{mosip}")))
            .unwrap();
    for (field, value) in changes {
        if value.is_null() {
            v.as_object_mut().unwrap().remove(*field);
        } else {
            v[*field] = value.clone();
        }
    }
    v
}

fn share_url(mosip: &str, share: &str) -> Value {
    json!(format!(
        "http://{mosip}/v1/datashare/get/mpolicy-default-abis/mpartner-default-abis/{share}"
    ))
}

/// The common checks of a response: the spec's fields, echoing the request.
fn check_shape(request: &Value, response: &Value) {
    assert_eq!(response["id"], request["id"], "{response}");
    assert_eq!(response["requestId"], request["requestId"], "{response}");
    let time = response["responsetime"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "responsetime {time}"
    );
}

fn expect_success(request: &Value, response: &Value) {
    check_shape(request, response);
    assert_eq!(response["returnValue"], "1", "{request} -> {response}");
    assert!(response.get("failureReason").is_none(), "{response}");
}

fn expect_failure(request: &Value, response: &Value, reason: &str) {
    check_shape(request, response);
    assert_eq!(response["returnValue"], "2", "{request} -> {response}");
    assert_eq!(response["failureReason"], reason, "{request} -> {response}");
}

fn candidates(response: &Value) -> Vec<String> {
    let list = &response["candidateList"];
    let ids: Vec<String> = list["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["modalities"][0]["biometricType"], "FIR", "{c}");
            assert!(
                c["analytics"]["internalScore"]
                    .as_str()
                    .unwrap()
                    .parse::<f64>()
                    .is_ok(),
                "{c}"
            );
            c["referenceId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(list["count"], ids.len().to_string(), "{response}");
    ids
}

struct HttpAbis {
    base: String,
    http: reqwest::Client,
}

impl HttpAbis {
    async fn send(&self, request: &Value) -> Value {
        let r = self
            .http
            .post(format!("{}/abis/v1/request", self.base))
            .bearer_auth(TOKEN)
            .body(request.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }
}

async fn wait_ready(run: &mut Running, base: &str) {
    let http = reqwest::Client::new();
    let by = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            Instant::now() < by,
            "abis serve not ready; stderr:\n{}",
            run.stderr_so_far()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start(dir: &Path, port: u16, env: &[(&str, &str)]) -> Running {
    let mut env = env.to_vec();
    let listen = format!("127.0.0.1:{port}");
    env.push(("CARDPIPE__ABIS__LISTEN", &listen));
    let mut run = Running::start(dir, free_port(), &["abis", "serve"], &env);
    run.wait_for("MOSIP ABIS API serving", Duration::from_secs(120));
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn mosip_drives_the_abis_over_http_with_the_spec_messages() {
    let (mosip, side) = start_mosip().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pipeline.toml"), config(&mosip, "")).unwrap();
    let port = free_port();
    let mut run = start(dir.path(), port, &[]);
    let abis = HttpAbis {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    };
    wait_ready(&mut run, &abis.base).await;

    // No token, a wrong token: refused before anything is read.
    let r = abis
        .http
        .post(format!("{}/abis/v1/request", abis.base))
        .body(SPEC_PING)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = abis
        .http
        .post(format!("{}/abis/v1/request", abis.base))
        .bearer_auth("guess")
        .body(SPEC_PING)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let ping = message(SPEC_PING, &mosip, &[]);
    expect_success(&ping, &abis.send(&ping).await);

    // The spec's insert, as recorded; then the same message again (a redelivery).
    let insert_a = message(
        SPEC_INSERT,
        &mosip,
        &[("referenceURL", share_url(&mosip, "share-a"))],
    );
    expect_success(&insert_a, &abis.send(&insert_a).await);
    expect_success(&insert_a, &abis.send(&insert_a).await);
    // The same reference id under a new request id: already in the ABIS.
    let again = message(
        SPEC_INSERT,
        &mosip,
        &[
            ("requestId", json!("req-insert-a-2")),
            ("referenceURL", share_url(&mosip, "share-b")),
        ],
    );
    expect_failure(&again, &abis.send(&again).await, "10");
    for (req, reference, share) in [
        ("req-insert-b", B, "share-b"),
        ("req-insert-c", C, "share-c"),
    ] {
        let m = message(
            SPEC_INSERT,
            &mosip,
            &[
                ("requestId", json!(req)),
                ("referenceId", json!(reference)),
                ("referenceURL", share_url(&mosip, share)),
            ],
        );
        expect_success(&m, &abis.send(&m).await);
    }
    let count = message(SPEC_COUNT, &mosip, &[]);
    let counted = abis.send(&count).await;
    expect_success(&count, &counted);
    assert_eq!(counted["count"], "3");

    // The spec's identify, as recorded: a gallery of B and four ids the ABIS does not hold.
    // C is another person than B: no candidate.
    let identify = message(SPEC_IDENTIFY, &mosip, &[]);
    let found = abis.send(&identify).await;
    expect_success(&identify, &found);
    assert_eq!(candidates(&found), Vec::<String>::new(), "{found}");
    // Without a gallery: C's mate A, and nobody else.
    let identify_all = message(
        SPEC_IDENTIFY,
        &mosip,
        &[
            ("requestId", json!("req-identify-c")),
            ("gallery", Value::Null),
        ],
    );
    let found = abis.send(&identify_all).await;
    expect_success(&identify_all, &found);
    assert_eq!(candidates(&found), vec![A.to_owned()], "{found}");
    // By referenceURL only (MOSIP's custom workflows): fresh biometrics of A's person.
    let by_url = message(
        SPEC_IDENTIFY,
        &mosip,
        &[
            ("requestId", json!("req-identify-url")),
            ("referenceId", json!("")),
            ("referenceURL", share_url(&mosip, "share-c")),
            ("gallery", Value::Null),
        ],
    );
    let found = abis.send(&by_url).await;
    expect_success(&by_url, &found);
    let ids = candidates(&found);
    assert!(
        ids.contains(&A.to_owned()) && ids.contains(&C.to_owned()) && !ids.contains(&B.to_owned()),
        "{found}"
    );
    // An identify of a reference id the ABIS does not hold.
    let unknown = message(
        SPEC_IDENTIFY,
        &mosip,
        &[
            ("requestId", json!("req-identify-x")),
            ("referenceId", json!("not-inserted")),
            ("gallery", Value::Null),
        ],
    );
    expect_failure(&unknown, &abis.send(&unknown).await, "12");

    // Every defect its failure reason.
    let cases: Vec<(Value, &str)> = vec![
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-expired")),
                    ("referenceId", json!("ref-expired")),
                    ("referenceURL", share_url(&mosip, "expired")),
                ],
            ),
            "17",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-gone")),
                    ("referenceId", json!("ref-gone")),
                    ("referenceURL", share_url(&mosip, "no-such-share")),
                ],
            ),
            "7",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-images")),
                    ("referenceId", json!("ref-images")),
                    ("referenceURL", share_url(&mosip, "share-images")),
                ],
            ),
            "16",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-iris")),
                    ("referenceId", json!("ref-iris")),
                    ("referenceURL", share_url(&mosip, "share-iris")),
                ],
            ),
            "11",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-no-url")),
                    ("referenceId", json!("ref-no-url")),
                    ("referenceURL", Value::Null),
                ],
            ),
            "8",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-no-ref")),
                    ("referenceId", Value::Null),
                ],
            ),
            "5",
        ),
        (
            message(SPEC_INSERT, &mosip, &[("requestId", Value::Null)]),
            "6",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-no-time")),
                    ("requesttime", Value::Null),
                ],
            ),
            "9",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-bad-time")),
                    ("requesttime", json!("yesterday")),
                ],
            ),
            "15",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-version")),
                    ("version", json!("0.9")),
                ],
            ),
            "13",
        ),
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("req-id")),
                    ("id", json!("mosip.abis.update")),
                ],
            ),
            "14",
        ),
        // The spec's identify request id, reused for an insert.
        (
            message(
                SPEC_INSERT,
                &mosip,
                &[
                    ("requestId", json!("01234567-89AB-CDEF-0123-456789ABCDEF")),
                    ("referenceURL", share_url(&mosip, "share-b")),
                ],
            ),
            "4",
        ),
    ];
    for (request, reason) in &cases {
        let response = abis.send(request).await;
        if request.get("requestId").is_some() {
            check_shape(request, &response);
        }
        assert_eq!(response["returnValue"], "2", "{request} -> {response}");
        assert_eq!(
            response["failureReason"], *reason,
            "{request} -> {response}"
        );
    }
    let r = abis
        .http
        .post(format!("{}/abis/v1/request", abis.base))
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["returnValue"].as_str(), v["failureReason"].as_str()),
        (Some("2"), Some("4")),
        "{v}"
    );

    // The spec's delete names a reference id the ABIS does not hold; then A is deleted.
    let delete_spec = message(
        SPEC_DELETE,
        &mosip,
        &[("requestId", json!("req-delete-spec"))],
    );
    expect_failure(&delete_spec, &abis.send(&delete_spec).await, "12");
    let delete_a = message(
        SPEC_DELETE,
        &mosip,
        &[
            ("requestId", json!("req-delete-a")),
            ("referenceId", json!(A)),
        ],
    );
    expect_success(&delete_a, &abis.send(&delete_a).await);
    let pending = message(SPEC_PENDING, &mosip, &[]);
    let jobs = abis.send(&pending).await;
    expect_success(&pending, &jobs);
    assert_eq!(jobs["jobscount"], "0");
    assert_eq!(
        *side.logins.lock().unwrap(),
        1,
        "one AuthN login, the token reused"
    );

    // A restart: the gallery and the recorded answers come back from the store.
    assert!(run.terminate().success());
    let mut run = start(dir.path(), port, &[]);
    wait_ready(&mut run, &abis.base).await;
    let counted = abis.send(&count).await;
    assert_eq!(counted["count"], "2", "{counted}");
    // A redelivered message gets its recorded answer, including the candidates.
    let found = abis.send(&identify_all).await;
    assert_eq!(candidates(&found), vec![A.to_owned()], "{found}");
    expect_success(&insert_a, &abis.send(&insert_a).await);
    // A new search no longer finds the deleted A.
    let identify_after = message(
        SPEC_IDENTIFY,
        &mosip,
        &[
            ("requestId", json!("req-identify-c-2")),
            ("gallery", Value::Null),
        ],
    );
    let found = abis.send(&identify_after).await;
    assert_eq!(candidates(&found), Vec::<String>::new(), "{found}");
    let stderr = run.stderr_so_far();
    assert!(run.terminate().success());

    // Nothing biometric, no token or secret in the log.
    let record = base64_of(&tenprint(1, 1)[0].record);
    for secret in [&record[..40], JWT, "abis-secret", TOKEN] {
        assert!(!stderr.contains(secret), "the log shows {secret:?}");
    }
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn mosip_drives_the_abis_over_a_rabbitmq_queue_pair_on_postgres() {
    use futures::StreamExt;
    use lapin::options::*;
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let (mosip, _side) = start_mosip().await;
    let dir = tempfile::tempdir().unwrap();
    let store_url = cardpipe_common::testing::fresh_postgres_url().await;
    let amqp = cardpipe_common::testing::amqp_url();
    let inbound = cardpipe_common::testing::unique("abis-in-");
    let outbound = cardpipe_common::testing::unique("abis-out-");
    std::fs::write(
        dir.path().join("pipeline.toml"),
        config(
            &mosip,
            &format!(
                "[abis.queue]\nenabled = true\nurl = \"{amqp}\"\ninbound = \"{inbound}\"\noutbound = \"{outbound}\"\n\
                 [store]\nurl = \"{store_url}\"\n"
            ),
        ),
    )
    .unwrap();
    let port = free_port();
    let mut run = start(dir.path(), port, &[]);
    run.wait_for("MOSIP ABIS queue pair consumed", Duration::from_secs(60));

    // MOSIP's side of the queues.
    let connection = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut responses = channel
        .basic_consume(
            outbound.as_str().into(),
            "mosip-test".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let send = |m: Value| {
        let channel = channel.clone();
        let inbound = inbound.clone();
        async move {
            channel
                .basic_publish(
                    "".into(),
                    inbound.as_str().into(),
                    BasicPublishOptions::default(),
                    m.to_string().as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    // Published back to back: answered in queue order, so the identify sees both inserts.
    let insert_a = message(
        SPEC_INSERT,
        &mosip,
        &[("referenceURL", share_url(&mosip, "share-a"))],
    );
    let insert_c = message(
        SPEC_INSERT,
        &mosip,
        &[
            ("requestId", json!("q-insert-c")),
            ("referenceId", json!(C)),
            ("referenceURL", share_url(&mosip, "share-c")),
        ],
    );
    let identify = message(SPEC_IDENTIFY, &mosip, &[("gallery", Value::Null)]);
    let count = message(SPEC_COUNT, &mosip, &[("requestId", json!("q-count"))]);
    let sent = [insert_a.clone(), insert_c, identify.clone(), count];
    for m in &sent {
        send(m.clone()).await;
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let d = tokio::time::timeout(Duration::from_secs(60), responses.next())
            .await
            .unwrap_or_else(|_| panic!("no response; stderr:\n{}", run.stderr_so_far()))
            .unwrap()
            .unwrap();
        got.push(serde_json::from_slice::<Value>(&d.data).unwrap());
    }
    for (request, response) in sent.iter().zip(&got) {
        expect_success(request, response);
    }
    assert_eq!(candidates(&got[2]), vec![A.to_owned()], "{}", got[2]);
    assert_eq!(got[3]["count"], "2");

    // A restart (SIGTERM) with the same insert redelivered: the recorded answer, no duplicate.
    assert!(run.terminate().success());
    let mut run = start(dir.path(), port, &[]);
    run.wait_for("MOSIP ABIS queue pair consumed", Duration::from_secs(60));
    let count_again = message(SPEC_COUNT, &mosip, &[("requestId", json!("q-count-2"))]);
    send(insert_a.clone()).await;
    send(count_again.clone()).await;
    let mut again = Vec::new();
    while again.len() < 2 {
        let d = tokio::time::timeout(Duration::from_secs(60), responses.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        again.push(serde_json::from_slice::<Value>(&d.data).unwrap());
    }
    expect_success(&insert_a, &again[0]);
    assert_eq!(again[1]["count"], "2", "{}", again[1]);
    assert!(run.terminate().success());
}
