//! Sign-in limits in the store, on both backend families: a flood of parallel wrong
//! passwords against one login, spread over two guards (two replicas of the console) on one
//! store, gets at most the allowed number of password checks; one client address is limited
//! across logins; the window expires; a successful sign-in gives its attempts back. Once,
//! 300 parallel guesses got 35-45 checks where 5 were allowed (the count was checked before
//! and recorded after the password check, in each process's memory).

use std::time::Duration;

use cardpipe_common::clock::{Clock, TestClock};
use cardpipe_common::runtime::Services;
use cardpipe_common::testing::{self, Mode};
use cardpipe_console::auth::{self, AuthError, LoginGuard, LoginLimits, Role};
use sqlx::Row;
use std::sync::Arc;

const PASSWORD: &str = "the-right-password-1";

fn limits() -> LoginLimits {
    LoginLimits {
        per_login: 5,
        per_address: 12,
        window: Duration::from_secs(900),
        concurrent_checks: 2,
    }
}

async fn rows(services: &Services) -> i64 {
    sqlx::query("SELECT COUNT(*) FROM sign_in_limits")
        .fetch_one(services.store.pool())
        .await
        .unwrap()
        .try_get::<i64, _>(0)
        .unwrap()
}

async fn setup(mode: Mode) -> (Services, Arc<TestClock>, Option<tempfile::TempDir>) {
    let clock = Arc::new(TestClock::at(time::macros::datetime!(2026-12-06 08:00 UTC)));
    let (services, guard) = testing::services(mode, Some(clock.clone() as Arc<dyn Clock>)).await;
    for login in ["admin", "sara"] {
        auth::add_operator(
            &services,
            login,
            Role::Supervisor,
            PASSWORD,
            ("system:test", "system"),
        )
        .await
        .unwrap();
    }
    (services, clock, guard)
}

macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(cardpipe_common::testing::Mode::Embedded).await } )*
        }
        mod distributed {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $name() { super::$name(cardpipe_common::testing::Mode::Distributed).await } )*
        }
    };
}

both_modes!(
    a_parallel_flood_on_two_replicas_gets_at_most_the_allowed_checks,
    one_address_is_limited_across_logins,
);

async fn a_parallel_flood_on_two_replicas_gets_at_most_the_allowed_checks(mode: Mode) {
    let (services, clock, _g) = setup(mode).await;
    let replicas = [
        LoginGuard::new(&services, limits()),
        LoginGuard::new(&services, limits()),
    ];
    let now = clock.now();
    let guesses = (0..300).map(|n| {
        let guard = replicas[n % 2].clone();
        let store = services.store.clone();
        // Many addresses: only the per-login limit applies.
        let address = format!("10.1.{}.{}", n / 200, n % 200);
        tokio::spawn(async move {
            guard
                .login(&store, "admin", &format!("guess-{n}"), Some(&address), now)
                .await
        })
    });
    let results = futures::future::join_all(guesses).await;
    let mut limited = 0;
    for r in results {
        match r.unwrap() {
            Err(AuthError::BadCredentials) => {}
            Err(AuthError::RateLimited(wait)) => {
                assert!(wait > 0 && wait <= 900, "{wait}");
                limited += 1;
            }
            other => panic!("a wrong password got {other:?}"),
        }
    }
    let checked: u64 = replicas.iter().map(LoginGuard::checks_evaluated).sum();
    assert!(
        checked <= 5,
        "{checked} password checks where 5 are allowed"
    );
    assert!(limited >= 295, "{limited}");
    // Even the right password is refused now, on either replica, without a check.
    let err = replicas[0]
        .login(&services.store, "admin", PASSWORD, Some("10.9.9.9"), now)
        .await
        .unwrap_err();
    assert!(matches!(err, AuthError::RateLimited(_)), "{err}");
    assert!(err.to_string().contains("too many failed logins"), "{err}");
    // Another login is not affected.
    replicas[1]
        .login(&services.store, "sara", PASSWORD, Some("10.9.9.9"), now)
        .await
        .expect("another login signs in");
    // Once the window has passed, the right password works again and resets the count.
    clock.advance(time::Duration::seconds(901));
    let later = clock.now();
    replicas[1]
        .login(&services.store, "admin", PASSWORD, Some("10.9.9.9"), later)
        .await
        .expect("signs in after the window");
    for n in 0..4 {
        let _ = replicas[0]
            .login(&services.store, "admin", &format!("x-{n}"), None, later)
            .await;
    }
    replicas[0]
        .login(&services.store, "admin", PASSWORD, None, later)
        .await
        .expect("a success gave its attempt back: 4 failures + 1 success fit in 5");
    // Rows are bounded by the attempts of one window: old ones are gone.
    clock.advance(time::Duration::seconds(901));
    let _ = replicas[0]
        .login(
            &services.store,
            "sara",
            "wrong-one",
            Some("10.2.0.1"),
            clock.now(),
        )
        .await;
    assert_eq!(
        rows(&services).await,
        2,
        "only this window's login and address rows"
    );
}

async fn one_address_is_limited_across_logins(mode: Mode) {
    let (services, clock, _g) = setup(mode).await;
    let guard = LoginGuard::new(&services, limits());
    let now = clock.now();
    let mut limited = 0;
    for n in 0..40 {
        match guard
            .login(
                &services.store,
                &format!("user{n}"),
                "whatever-guess",
                Some("192.0.2.7"),
                now,
            )
            .await
        {
            Err(AuthError::BadCredentials) => {}
            Err(AuthError::RateLimited(_)) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(limited, 28, "12 attempts per address, then refused");
    assert!(guard.checks_evaluated() <= 12);
    // The right password from that address is refused too; from another it works.
    assert!(matches!(
        guard
            .login(&services.store, "sara", PASSWORD, Some("192.0.2.7"), now)
            .await,
        Err(AuthError::RateLimited(_))
    ));
    guard
        .login(&services.store, "sara", PASSWORD, Some("192.0.2.8"), now)
        .await
        .expect("another address");
    // Logins that cannot exist cost no password check and no row of their own.
    let before = guard.checks_evaluated();
    let rows_before = rows(&services).await;
    for bad in ["Admin!", "", "x y"] {
        assert!(matches!(
            guard
                .login(&services.store, bad, "pw", Some("192.0.2.9"), now)
                .await,
            Err(AuthError::BadCredentials)
        ));
    }
    assert_eq!(guard.checks_evaluated(), before);
    assert_eq!(
        rows(&services).await,
        rows_before + 1,
        "only the address row"
    );
}
