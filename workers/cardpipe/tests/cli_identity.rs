//! Operator identity on the command line (embedded backends under a temporary ./var): a
//! login named with `--as`/`--operator` must be signed in with its own password
//! (`cardpipe login`, token file mode 0600 with an expiry); one person cannot act as
//! another, so a two-person rule needs two passwords; supervisors disable, enable and reset
//! the passwords of operators, which ends their sessions; all of it audited. Once, `--as`
//! took any login on trust and `operators add` without `--as` skipped the supervisor check.

use std::path::Path;
use std::process::Output;

mod common;

use cardpipe_common::store::Store;
use sqlx::Row;

fn cli(dir: &Path, args: &[&str], input: &str) -> Output {
    common::cli_with_input(dir, args, input)
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

const BOSS: &str = "boss-password-123";
const SARA: &str = "sara-password-123";
const OLGA: &str = "olga-password-123";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_identities_authenticate_and_supervisors_manage_operators() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&cli(d, &["migrate"], ""));
    // The very first operator needs no --as (nobody could sign in yet); the next ones do.
    ok(&cli(
        d,
        &["operators", "add", "boss", "--role", "supervisor"],
        &format!("{BOSS}\n"),
    ));
    refused(
        &cli(
            d,
            &["operators", "add", "mallory", "--role", "supervisor"],
            "mallory-password-1\n",
        ),
        "needs --as LOGIN of a supervisor",
    );
    // Naming a login is not enough: it must be signed in (no terminal here to ask).
    refused(
        &cli(
            d,
            &[
                "operators",
                "add",
                "sara",
                "--role",
                "supervisor",
                "--as",
                "boss",
            ],
            &format!("{SARA}\n"),
        ),
        "run `cardpipe login boss` first",
    );
    refused(
        &cli(d, &["login", "boss"], "not-the-password\n"),
        "wrong login or password",
    );
    let signed = ok(&cli(d, &["login", "boss"], &format!("{BOSS}\n")));
    assert!(
        signed.contains("signed in as boss (supervisor)"),
        "{signed}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("sessions.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the token file is the operator's alone"
        );
        let text = std::fs::read_to_string(d.join("sessions.json")).unwrap();
        assert!(text.contains("expires_at"), "{text}");
        assert!(!text.contains(BOSS), "the password is never stored");
    }
    ok(&cli(
        d,
        &[
            "operators",
            "add",
            "sara",
            "--role",
            "supervisor",
            "--as",
            "boss",
        ],
        &format!("{SARA}\n"),
    ));
    ok(&cli(
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
        &format!("{OLGA}\n"),
    ));
    ok(&cli(d, &["login", "olga"], &format!("{OLGA}\n")));

    // Dispatching at once is a supervisor's; with nothing packed it ships nothing.
    refused(
        &cli(d, &["ops", "--as", "olga", "dispatch", "--now"], ""),
        "supervisor",
    );
    refused(&cli(d, &["ops", "--as", "boss", "dispatch"], ""), "--now");
    let none = ok(&cli(d, &["ops", "--as", "boss", "dispatch", "--now"], ""));
    assert!(none.contains("nothing packed"), "{none}");
    // Citizen messages: anyone lists them; sending one again is a supervisor's.
    let listed = ok(&cli(d, &["ops", "sms", "list", "--state", "unsent"], ""));
    assert!(listed.contains("0 messages"), "{listed}");
    refused(
        &cli(d, &["ops", "--as", "olga", "sms", "resend", "R-1"], ""),
        "supervisor",
    );
    refused(
        &cli(d, &["ops", "--as", "boss", "sms", "resend", "R-1"], ""),
        "message R-1 not found",
    );

    // olga cannot act as sara (who has not signed in here): a two-person rule needs sara's
    // own password.
    refused(
        &cli(
            d,
            &["stock", "destroy", "witness", "DST-1", "--operator", "sara"],
            "",
        ),
        "cardpipe login sara",
    );
    refused(
        &cli(
            d,
            &[
                "operators",
                "disable",
                "boss",
                "--reason",
                "x",
                "--as",
                "olga",
            ],
            "",
        ),
        "needs a supervisor",
    );

    // A token file others may read is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = d.join("sessions.json");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
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
                    "olga",
                ],
                "",
            ),
            "may be read by others",
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    // Disabling ends olga's session at once; enabling lets her sign in again.
    ok(&cli(
        d,
        &[
            "operators",
            "disable",
            "olga",
            "--reason",
            "left the centre",
            "--as",
            "boss",
        ],
        "",
    ));
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
                "olga",
            ],
            "",
        ),
        "not signed in",
    );
    refused(
        &cli(d, &["login", "olga"], &format!("{OLGA}\n")),
        "wrong login or password",
    );
    // Each subcommand does what it says: a second disable is refused, never a toggle.
    refused(
        &cli(
            d,
            &[
                "operators",
                "disable",
                "olga",
                "--reason",
                "again",
                "--as",
                "boss",
            ],
            "",
        ),
        "already disabled",
    );
    ok(&cli(
        d,
        &[
            "operators",
            "enable",
            "olga",
            "--reason",
            "came back",
            "--as",
            "boss",
        ],
        "",
    ));
    refused(
        &cli(
            d,
            &[
                "operators",
                "enable",
                "olga",
                "--reason",
                "again",
                "--as",
                "boss",
            ],
            "",
        ),
        "already enabled",
    );
    ok(&cli(d, &["login", "olga"], &format!("{OLGA}\n")));

    // A reset password ends the sessions; the old password stops working.
    let reset = ok(&cli(
        d,
        &[
            "operators",
            "reset-password",
            "olga",
            "--generate",
            "--as",
            "boss",
        ],
        "",
    ));
    let new_password = reset
        .lines()
        .find_map(|l| l.strip_prefix("password (shown once): "))
        .expect("the new password is printed once")
        .trim()
        .to_owned();
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
                "olga",
            ],
            "",
        ),
        "not signed in",
    );
    refused(
        &cli(d, &["login", "olga"], &format!("{OLGA}\n")),
        "wrong login or password",
    );
    ok(&cli(d, &["login", "olga"], &format!("{new_password}\n")));

    // The last enabled supervisor cannot be disabled.
    ok(&cli(d, &["login", "sara"], &format!("{SARA}\n")));
    ok(&cli(
        d,
        &[
            "operators",
            "disable",
            "sara",
            "--reason",
            "leave",
            "--as",
            "boss",
        ],
        "",
    ));
    refused(
        &cli(
            d,
            &[
                "operators",
                "disable",
                "boss",
                "--reason",
                "oops",
                "--as",
                "boss",
            ],
            "",
        ),
        "last enabled supervisor",
    );

    // Logging out ends the session in the store and in the file.
    ok(&cli(d, &["logout", "boss"], ""));
    refused(
        &cli(
            d,
            &[
                "operators",
                "enable",
                "sara",
                "--reason",
                "x",
                "--as",
                "boss",
            ],
            "",
        ),
        "cardpipe login boss",
    );

    // Every step is in the audit log, and no password is.
    let db = Store::connect(
        &format!("sqlite:{}", d.join("var/cardpipe.db").display()),
        2,
    )
    .await
    .unwrap();
    let rows = sqlx::query("SELECT actor, action, subject, details FROM audit_log ORDER BY seq")
        .fetch_all(db.pool())
        .await
        .unwrap();
    let actions: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get("actor"), r.get("action"), r.get("subject")))
        .collect();
    for expected in [
        ("boss", "cli.login_failed", "boss"),
        ("boss", "cli.login", "boss"),
        ("boss", "operator.add", "sara"),
        ("boss", "operator.disable", "olga"),
        ("boss", "operator.enable", "olga"),
        ("boss", "operator.reset_password", "olga"),
        ("olga", "cli.login", "olga"),
        ("boss", "cli.logout", "boss"),
    ] {
        assert!(
            actions
                .iter()
                .any(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()) == expected),
            "{expected:?} not audited in {actions:?}"
        );
    }
    for r in &rows {
        let details: String = r.get("details");
        for secret in [BOSS, SARA, OLGA, new_password.as_str()] {
            assert!(!details.contains(secret), "a password in the audit log");
        }
    }
}
