//! `cardpipe bench intake` and `cardpipe bench sign-in`: what hostile or heavy input costs
//! (issue 15). Each runs on fresh backends (embedded, or `--distributed`: PostgreSQL,
//! RabbitMQ and S3 from the `CARDPIPE_TEST_*` settings) and prints its figures as JSON.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cardpipe_common::clock::{Clock, SystemClock};
use cardpipe_common::testing::{self, Mode};
use cardpipe_console::auth::{self, AuthError, LoginGuard, LoginLimits, Role};
use cardpipe_intake::bench::peak_rss_kib;
use serde::Serialize;

/// `cardpipe bench intake`.
#[derive(Debug, clap::Args)]
pub struct BenchIntakeArgs {
    /// Batches submitted at once.
    #[arg(long, default_value_t = 3)]
    pub submissions: usize,
    /// Records per batch.
    #[arg(long, default_value_t = 100_000)]
    pub records: usize,
    /// On PostgreSQL, RabbitMQ and S3 instead of the embedded backends.
    #[arg(long)]
    pub distributed: bool,
}

/// `cardpipe bench sign-in`.
#[derive(Debug, clap::Args)]
pub struct BenchSignInArgs {
    /// Parallel wrong guesses against one login, then as many against random logins from one
    /// address.
    #[arg(long, default_value_t = 1000)]
    pub guesses: usize,
    /// On PostgreSQL instead of SQLite.
    #[arg(long)]
    pub distributed: bool,
}

fn mode(distributed: bool) -> Mode {
    if distributed {
        Mode::Distributed
    } else {
        Mode::Embedded
    }
}

/// Three (by default) 100k-record batches received at once: records/s and peak RSS.
pub async fn intake(args: BenchIntakeArgs) -> anyhow::Result<()> {
    eprintln!(
        "bench intake: {} batches of {} records at once",
        args.submissions, args.records
    );
    let report = cardpipe_intake::bench::bench_intake_parallel(
        mode(args.distributed),
        args.submissions,
        args.records,
    )
    .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[derive(Debug, Serialize)]
struct SignInReport {
    mode: String,
    guesses: usize,
    allowed_per_login: usize,
    allowed_per_address: usize,
    /// Password checks run for the flood on one login (at most `allowed_per_login`).
    checks_one_login: u64,
    /// Password checks run for the flood from one address (at most `allowed_per_address`).
    checks_one_address: u64,
    refused_rate_limited: u64,
    refused_busy: u64,
    seconds: f64,
    peak_rss_kib_before: u64,
    peak_rss_kib_after: u64,
}

/// Floods the sign-in with parallel wrong guesses: the checks run stay within the limits and
/// the process's peak RSS stays bounded.
pub async fn sign_in(args: BenchSignInArgs) -> anyhow::Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (services, _guard) = testing::services(mode(args.distributed), Some(clock)).await;
    auth::add_operator(
        &services,
        "admin",
        Role::Supervisor,
        &auth::random_password(24),
        ("system:bench", "system"),
    )
    .await?;
    let limits = LoginLimits {
        per_login: 5,
        per_address: 50,
        window: Duration::from_secs(900),
        concurrent_checks: 4,
    };
    let guard = LoginGuard::new(&services, limits);
    let before = peak_rss_kib();
    let started = Instant::now();
    let now = services.clock.now();
    flood(&guard, &services, args.guesses, Some("admin"), None, now).await?;
    let checks_one_login = guard.checks_evaluated();
    flood(
        &guard,
        &services,
        args.guesses,
        None,
        Some("192.0.2.1"),
        now,
    )
    .await?;
    let report = SignInReport {
        mode: format!("{:?}", mode(args.distributed)),
        guesses: args.guesses,
        allowed_per_login: limits.per_login,
        allowed_per_address: limits.per_address,
        checks_one_login,
        checks_one_address: guard.checks_evaluated() - checks_one_login,
        refused_rate_limited: guard.failures_total("rate_limited"),
        refused_busy: guard.failures_total("busy"),
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kib_before: before,
        peak_rss_kib_after: peak_rss_kib(),
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    if report.checks_one_login > limits.per_login as u64
        || report.checks_one_address > limits.per_address as u64
    {
        anyhow::bail!("more password checks ran than the limits allow");
    }
    Ok(())
}

/// `guesses` parallel wrong sign-ins: against `login` (else a new login each) from `address`
/// (else a new address each).
async fn flood(
    guard: &LoginGuard,
    services: &cardpipe_common::runtime::Services,
    guesses: usize,
    login: Option<&'static str>,
    address: Option<&'static str>,
    now: time::OffsetDateTime,
) -> anyhow::Result<()> {
    let tasks = (0..guesses).map(|n| {
        let guard = guard.clone();
        let store = services.store.clone();
        tokio::spawn(async move {
            let login = login.map_or_else(|| format!("user{n}"), str::to_owned);
            let address =
                address.map_or_else(|| format!("10.{}.{}.1", n / 250, n % 250), str::to_owned);
            guard
                .login(&store, &login, &format!("guess-{n}"), Some(&address), now)
                .await
        })
    });
    for r in futures::future::join_all(tasks).await {
        match r? {
            Err(AuthError::BadCredentials | AuthError::RateLimited(_) | AuthError::Busy) => {}
            other => anyhow::bail!("a wrong guess got {other:?}"),
        }
    }
    Ok(())
}
