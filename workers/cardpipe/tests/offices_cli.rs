//! The command line of the office follow-up (embedded backends under a temporary ./var):
//! `cardpipe offices clients add|list|revoke` (supervisors only, token printed once and
//! stored hashed, audited), `cardpipe ops discrepancies` / `discrepancy-resolve` (supervisors
//! only), and the operator checks of `cardpipe stock` / `cardpipe reprint`; also
//! `cardpipe pki export` (the CA certificates for relying parties).

use std::path::Path;
use std::process::Output;

mod common;

use cardpipe_common::store::Store;
use common::cli_with_input;
use sqlx::Row;

fn cli(dir: &Path, args: &[&str]) -> Output {
    cli_with_input(dir, args, "")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should have failed: {err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offices_clients_and_discrepancies_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&cli(d, &["migrate"]));
    ok(&cli_with_input(
        d,
        &["operators", "add", "boss", "--role", "supervisor"],
        "boss-password-1\n",
    ));
    ok(&cli_with_input(d, &["login", "boss"], "boss-password-1\n"));
    ok(&cli_with_input(
        d,
        &[
            "operators",
            "add",
            "olga",
            "--role",
            "operator",
            "--as",
            "boss",
        ],
        "olga-password-1\n",
    ));
    ok(&cli_with_input(d, &["login", "olga"], "olga-password-1\n"));

    // Delivery API clients: supervisors only; the token is printed once, stored hashed.
    refused(
        &cli(
            d,
            &[
                "offices", "clients", "add", "teh1", "--office", "TEH-001", "--as", "olga",
            ],
        ),
        "needs a supervisor",
    );
    refused(
        &cli(
            d,
            &[
                "offices", "clients", "add", "nowhere", "--office", "ZZZ-9", "--as", "boss",
            ],
        ),
        "not in the offices register",
    );
    let added = ok(&cli(
        d,
        &[
            "offices", "clients", "add", "teh1", "--office", "TEH-001", "--as", "boss",
        ],
    ));
    let token = added
        .lines()
        .find_map(|l| l.strip_prefix("bearer token (shown once, store it now): "))
        .expect("the token is printed")
        .trim()
        .to_owned();
    assert!(token.starts_with("cpo_"), "{added}");
    ok(&cli(
        d,
        &[
            "offices", "clients", "add", "hq", "--centre", "--as", "boss",
        ],
    ));
    let listed = ok(&cli(d, &["offices", "clients", "list"]));
    assert!(
        listed.contains("teh1") && listed.contains("TEH-001") && listed.contains("(centre-wide)"),
        "{listed}"
    );
    assert!(!listed.contains(&token), "tokens are never listed");

    // A discrepancy to resolve (a missing card still on its way).
    let db = Store::connect(
        &format!("sqlite:{}", d.join("var/cardpipe.db").display()),
        2,
    )
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO applications (id, registry_id, batch_id, state, priority, created_at, updated_at)
         VALUES ('app-cli-1', 'REG-cli-1', NULL, 'shipped', 'normal', '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO delivery_discrepancies (id, box_id, office_code, kind, application_id, reported_by, reported_at)
         VALUES ('dsc-cli-1', 'BOX-1', 'TEH-001', 'missing', 'app-cli-1', 'office:TEH-001:c1', '2026-01-02T00:00:00.000000Z')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let open = ok(&cli(d, &["ops", "discrepancies", "--open"]));
    assert!(
        open.contains("dsc-cli-1") && open.contains("OPEN") && open.contains("1 open"),
        "{open}"
    );
    refused(
        &cli(
            d,
            &[
                "ops",
                "--as",
                "olga",
                "discrepancy-resolve",
                "dsc-cli-1",
                "--outcome",
                "found",
                "--note",
                "x",
            ],
        ),
        "needs a supervisor",
    );
    refused(
        &cli(
            d,
            &[
                "ops",
                "--as",
                "boss",
                "discrepancy-resolve",
                "dsc-cli-1",
                "--outcome",
                "returned",
                "--note",
                "x",
            ],
        ),
        "found or lost",
    );
    let resolved = ok(&cli(
        d,
        &[
            "ops",
            "--as",
            "boss",
            "discrepancy-resolve",
            "dsc-cli-1",
            "--outcome",
            "found",
            "--note",
            "turned up in the van",
        ],
    ));
    assert!(resolved.contains("resolved: found"), "{resolved}");
    let open = ok(&cli(d, &["ops", "discrepancies", "--open"]));
    assert!(
        open.contains("0 open") && !open.contains("dsc-cli-1"),
        "{open}"
    );
    let all = ok(&cli(d, &["ops", "discrepancies"]));
    assert!(
        all.contains("dsc-cli-1") && all.contains("turned up in the van") && all.contains("boss"),
        "{all}"
    );

    // Revocation.
    refused(
        &cli(d, &["offices", "clients", "revoke", "teh1", "--as", "olga"]),
        "needs a supervisor",
    );
    ok(&cli(
        d,
        &["offices", "clients", "revoke", "teh1", "--as", "boss"],
    ));
    let listed = ok(&cli(d, &["offices", "clients", "list"]));
    assert!(listed.contains("revoked"), "{listed}");

    // Stock and reprints: the operator must exist; witness and reprint need a supervisor.
    refused(
        &cli(
            d,
            &["stock", "destroy", "witness", "DST-1", "--operator", "olga"],
        ),
        "needs a supervisor",
    );
    refused(
        &cli(
            d,
            &[
                "reprint",
                "app-cli-1",
                "--reason",
                "damaged",
                "--operator",
                "olga",
            ],
        ),
        "needs a supervisor",
    );
    refused(
        &cli(
            d,
            &[
                "stock",
                "return",
                "BLK-1",
                "--reason",
                "x",
                "--operator",
                "mallory",
            ],
        ),
        "not signed in",
    );

    // Audited under the supervisor.
    let actions: Vec<(String, String)> = sqlx::query(
        "SELECT actor, action FROM audit_log WHERE action LIKE 'delivery.%' ORDER BY seq",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get("actor"), r.get("action")))
    .collect();
    for expected in [
        "delivery.api_client_add",
        "delivery.discrepancy_resolve",
        "delivery.api_client_revoke",
    ] {
        assert!(
            actions.iter().any(|(a, x)| a == "boss" && x == expected),
            "{expected} in {actions:?}"
        );
    }
    let stored: String =
        sqlx::query("SELECT token_sha256 FROM delivery_api_clients WHERE name = 'teh1'")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .get(0);
    assert_ne!(stored, token);
    assert_eq!(stored.len(), 64);
    db.close().await;
}

/// `cardpipe pki export` writes the public CA certificates a relying party needs, each a
/// parseable PEM certificate, and chain.pem with issuing + root; nothing private.
#[test]
fn the_ca_certificates_can_be_exported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&cli(d, &["migrate"]));
    ok(&cli(d, &["pki", "init"]));
    let out = ok(&cli(d, &["pki", "export", "--out", "ca"]));
    for name in ["root.pem", "issuing.pem", "document-signer.pem"] {
        assert!(out.contains(name), "{out}");
        let pem = std::fs::read_to_string(d.join("ca").join(name)).unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----"),
            "{name}: {pem}"
        );
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1, "{name}");
        assert!(!pem.contains("PRIVATE"), "{name}");
    }
    assert!(out.contains("SHA-256 "), "{out}");
    let chain = std::fs::read_to_string(d.join("ca/chain.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    let root = std::fs::read_to_string(d.join("ca/root.pem")).unwrap();
    assert!(chain.ends_with(&root), "chain.pem ends with the root");
    // Without a hierarchy there is nothing to export, said plainly.
    let empty = tempfile::tempdir().unwrap();
    ok(&cli(empty.path(), &["migrate"]));
    refused(
        &cli(empty.path(), &["pki", "export", "--out", "ca"]),
        "cardpipe pki init",
    );
}
