//! Credential sets per second on one core, software keystore and SoftHSM2.
//!
//! ```text
//! cargo run --release -p cardpipe-pki --example bench_pki -- [SETS] [--softhsm]
//! ```
//!
//! With `--softhsm` it creates a throw-away SoftHSM2 token and re-runs itself with
//! `SOFTHSM2_CONF` set (the module reads it at initialisation; see
//! `cardpipe_pki::keystore::softhsm`). `cardpipe bench pki` calls the same
//! `cardpipe_pki::bench` functions.

use std::process::Command;
use std::sync::Arc;

use cardpipe_pki::bench;
use cardpipe_pki::keystore::Pkcs11KeyStore;
use cardpipe_pki::keystore::softhsm::SoftHsmSandbox;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sets: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5_000);
    if !args.iter().any(|a| a == "--softhsm") {
        println!("{}", bench::run_software(sets)?);
        return Ok(());
    }
    if let Ok(dir) = std::env::var("BENCH_SOFTHSM_DIR") {
        let sandbox_conf = std::path::Path::new(&dir).join("softhsm2.conf");
        assert!(sandbox_conf.exists());
        let config = cardpipe_pki::keystore::Pkcs11Config {
            module: cardpipe_pki::keystore::softhsm::SOFTHSM2_MODULE.into(),
            token_label: "bench".into(),
            pin: secrecy::SecretString::from("1234"),
        };
        let store = Arc::new(Pkcs11KeyStore::open(&config)?);
        println!("{}", bench::run(store, sets)?);
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let sandbox = SoftHsmSandbox::create(dir.path(), "bench", "12345678", "1234")?;
    let status = Command::new(std::env::current_exe()?)
        .args(&args)
        .envs(sandbox.env())
        .env("BENCH_SOFTHSM_DIR", dir.path())
        .status()?;
    if !status.success() {
        return Err("SoftHSM2 benchmark child failed".into());
    }
    Ok(())
}
