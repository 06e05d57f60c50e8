//! `cardpipe bench pki`: credential sets per second on one core.
//!
//! A credential set is what the keys stage produces per card: two P-256 key pairs, two
//! certificates, EF.SOD (and, because the stage does it too, the LDS encoding and the two
//! key wraps). The loop runs [`CardIssuer::issue`] on one thread, so the figure is per core;
//! the report gives wall-clock rates and rates per CPU-second of the thread (the latter do
//! not drop when other processes compete for the cores). A second loop measures
//! certificates alone (key pair + certificate).
//! CA and DS signatures go through whatever [`CaKeyStore`] is passed in: the file keystore
//! (software) or a PKCS#11 token (SoftHSM2). For SoftHSM2 the process must have been started
//! with `SOFTHSM2_CONF` pointing at the token (see [`crate::keystore::softhsm`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ca::{CaConfig, init};
use crate::citizen::{CardKeyPair, CardKeyRole, CitizenIssuer, CitizenProfiles, CitizenSubject};
use crate::custody::TransportKey;
use crate::issue::CardIssuer;
use crate::keystore::{Backend, CaKeyStore, FileKeyStore, KdfParams};
use crate::lds::sample_input;
use crate::{KeysError, Result};

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Keystore backend used for CA/DS signatures.
    pub backend: Backend,
    /// Credential sets produced.
    pub sets: usize,
    /// Wall time of the credential-set loop (setup excluded).
    pub elapsed: Duration,
    /// CPU time the benchmark thread spent in that loop (Linux; `None` elsewhere). On a
    /// shared machine wall time includes time the thread waited for a core; CPU time does
    /// not, so the per-CPU-second figures are the "per core" capacity.
    pub cpu_seconds: Option<f64>,
    /// Credential sets per wall-clock second (one thread).
    pub sets_per_second: f64,
    /// Credential sets per CPU second of the thread.
    pub sets_per_cpu_second: Option<f64>,
    /// Citizen certificates per wall-clock second within credential sets (two per set).
    pub certificates_per_second: f64,
    /// Certificate-only loop (key pair + certificate, no LDS/SOD/wrap) per wall-clock second:
    /// the figure comparable with a CA product's "certificates per second".
    pub certificate_only_per_second: f64,
    /// The same per CPU second.
    pub certificate_only_per_cpu_second: Option<f64>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpu = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.0}"));
        write!(
            f,
            "{}: {} credential sets (2 key pairs + 2 certificates + EF.SOD + LDS + 2 key wraps) in {:.3} s on one thread\n  \
             credential sets/s: {:.0} wall, {} per CPU-second\n  \
             certificates/s within sets: {:.0} wall, {} per CPU-second\n  \
             certificate-only (key pair + certificate) /s: {:.0} wall, {} per CPU-second",
            self.backend,
            self.sets,
            self.elapsed.as_secs_f64(),
            self.sets_per_second,
            cpu(self.sets_per_cpu_second),
            self.certificates_per_second,
            cpu(self.sets_per_cpu_second.map(|v| 2.0 * v)),
            self.certificate_only_per_second,
            cpu(self.certificate_only_per_cpu_second),
        )
    }
}

fn thread_cpu_seconds() -> Option<f64> {
    Some(cardpipe_common::cpu::thread_cpu_seconds())
}

/// Runs `f` `n` times; returns (wall, CPU seconds).
fn timed(n: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<(Duration, Option<f64>)> {
    let cpu0 = thread_cpu_seconds();
    let start = Instant::now();
    for i in 0..n {
        f(i)?;
    }
    let wall = start.elapsed();
    let cpu = match (cpu0, thread_cpu_seconds()) {
        (Some(a), Some(b)) if b > a => Some(b - a),
        _ => None,
    };
    Ok((wall, cpu))
}

/// Runs the benchmark against `store`: sets up a throw-away hierarchy (labels prefixed
/// `bench-<random>`, so it can run against a production token without touching real keys),
/// warms up, then issues `sets` credential sets.
pub fn run(store: Arc<dyn CaKeyStore>, sets: usize) -> Result<BenchReport> {
    if sets == 0 {
        return Err(KeysError::Invalid(
            "benchmark needs at least one set".into(),
        ));
    }
    let mut tag = [0u8; 4];
    openssl::rand::rand_bytes(&mut tag)?;
    let config = CaConfig {
        label_prefix: format!("bench-{}", hex::encode(tag)),
        ..CaConfig::default()
    };
    let now = time::OffsetDateTime::now_utc();
    let hierarchy = init(store.as_ref(), &config, now)?;
    let issuer = CardIssuer::new(store.clone(), &hierarchy, &CitizenProfiles::default())?;
    let transport = TransportKey::generate("bench-site")?;
    let inputs: Vec<_> = (0..16).map(|i| sample_input(100_000 + i)).collect();
    for (i, input) in inputs.iter().enumerate().take(8) {
        issuer.issue(&format!("warmup-{i}"), input, &transport, now)?;
    }
    let mut bytes = 0usize;
    let (elapsed, cpu_seconds) = timed(sets, |i| {
        let creds = issuer.issue(
            &format!("APP-{i:08}"),
            &inputs[i % inputs.len()],
            &transport,
            now,
        )?;
        bytes += creds.ef_sod.len();
        Ok(())
    })?;
    std::hint::black_box(bytes);

    let citizen = CitizenIssuer::new(
        store.clone(),
        &hierarchy.issuing,
        &CitizenProfiles::default(),
    )?;
    let subject = CitizenSubject {
        national_code: inputs[0].personal.national_code.clone(),
        given_name: inputs[0].personal.first_name.clone(),
        surname: inputs[0].personal.last_name.clone(),
    };
    let (cert_elapsed, cert_cpu) = timed(sets, |_| {
        let key = CardKeyPair::generate()?;
        std::hint::black_box(citizen.issue(
            &subject,
            CardKeyRole::Signature,
            &key.public_key,
            now,
        )?);
        Ok(())
    })?;

    let per = |secs: f64| sets as f64 / secs.max(1e-9);
    let sets_per_second = per(elapsed.as_secs_f64());
    Ok(BenchReport {
        backend: store.backend(),
        sets,
        elapsed,
        cpu_seconds,
        sets_per_second,
        sets_per_cpu_second: cpu_seconds.map(per),
        certificates_per_second: 2.0 * sets_per_second,
        certificate_only_per_second: per(cert_elapsed.as_secs_f64()),
        certificate_only_per_cpu_second: cert_cpu.map(per),
    })
}

/// Runs [`run`] with a fresh file keystore in a temporary directory (software mode).
pub fn run_software(sets: usize) -> Result<BenchReport> {
    let dir = tempfile::tempdir().map_err(|source| KeysError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let store = FileKeyStore::create(
        dir.path().join("bench.keystore"),
        &secrecy::SecretString::from("benchmark only"),
        KdfParams::for_tests(),
    )?;
    run(Arc::new(store), sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn software_bench_reports_consistent_figures() {
        let report = run_software(20).unwrap();
        assert_eq!(report.sets, 20);
        assert_eq!(report.backend, Backend::File);
        assert!(report.sets_per_second > 0.0);
        assert!((report.certificates_per_second - 2.0 * report.sets_per_second).abs() < 1e-6);
        assert!(report.certificate_only_per_second > 0.0);
        assert!(report.cpu_seconds.is_some_and(|c| c > 0.0));
        assert!(report.to_string().contains("credential sets"));
    }
}
