//! Throw-away SoftHSM2 tokens for tests and `cardpipe bench pki --hsm`.
//!
//! SoftHSM2 reads its configuration from the `SOFTHSM2_CONF` environment variable when the
//! module is initialised. This crate forbids `unsafe`, and setting the environment of a
//! running Rust 2024 program is `unsafe`, so the in-process module can only see a private
//! configuration if the process was *started* with it. [`SoftHsmSandbox`] therefore does
//! two things: it creates a private token directory and configuration and initialises a
//! token there (running `softhsm2-util` as a child with the variable set), and it tells the
//! caller which environment to start the PKCS#11-using process with
//! ([`SoftHsmSandbox::env`]). The crate's own tests re-run themselves as a child process
//! with that environment.

use std::path::{Path, PathBuf};
use std::process::Command;

use secrecy::SecretString;

use super::Pkcs11Config;
use crate::{KeysError, Result};

/// Where Debian's softhsm2 package installs the module.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 configuration and initialised token inside a directory the caller owns.
#[derive(Clone)]
pub struct SoftHsmSandbox {
    /// The `softhsm2.conf` written for this sandbox.
    pub conf: PathBuf,
    /// The token's label.
    pub token_label: String,
    user_pin: String,
}

impl std::fmt::Debug for SoftHsmSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftHsmSandbox")
            .field("conf", &self.conf)
            .field("token_label", &self.token_label)
            .finish_non_exhaustive()
    }
}

impl SoftHsmSandbox {
    /// Writes `<dir>/softhsm2.conf` and `<dir>/tokens/`, then initialises a token with the
    /// given label and PINs. Fails with a message naming the missing package if SoftHSM2 is
    /// not installed.
    pub fn create(dir: &Path, token_label: &str, so_pin: &str, user_pin: &str) -> Result<Self> {
        check_installed()?;
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(|source| KeysError::Io {
            path: tokens.clone(),
            source,
        })?;
        let conf = dir.join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        );
        std::fs::write(&conf, text).map_err(|source| KeysError::Io {
            path: conf.clone(),
            source,
        })?;
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                token_label,
                "--so-pin",
                so_pin,
                "--pin",
                user_pin,
            ])
            .output()
            .map_err(|source| KeysError::Io {
                path: "softhsm2-util".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(KeysError::Invalid(format!(
                "softhsm2-util --init-token failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Self {
            conf,
            token_label: token_label.to_owned(),
            user_pin: user_pin.to_owned(),
        })
    }

    /// Environment a child process needs so the module finds this sandbox's token.
    pub fn env(&self) -> [(&'static str, String); 1] {
        [("SOFTHSM2_CONF", self.conf.display().to_string())]
    }

    /// Connection settings for [`super::Pkcs11KeyStore::open`] (valid in a process started
    /// with [`Self::env`]).
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config {
            module: SOFTHSM2_MODULE.into(),
            token_label: self.token_label.clone(),
            pin: SecretString::from(self.user_pin.clone()),
        }
    }
}

/// Runs a test body against a fresh SoftHSM2 token.
///
/// SoftHSM2 reads `SOFTHSM2_CONF` when the module loads, and this workspace forbids the
/// `unsafe` needed to set environment variables at run time, so the test creates its sandbox
/// token and re-runs itself (`<test_name> --exact`) as a child process with the variable set.
/// The child runs `body` with the sandbox directory and writes a marker file when it completed,
/// so a filter that matched nothing cannot pass silently. Panics (failing the test) when
/// SoftHSM2 is missing, the child fails, or it ran no body.
pub fn run_in_sandbox(
    test_name: &str,
    token_label: &str,
    user_pin: &str,
    body: impl FnOnce(&Path),
) {
    const CHILD: &str = "CARDPIPE_SOFTHSM_CHILD";
    const DIR: &str = "CARDPIPE_SOFTHSM_DIR";
    if std::env::var(CHILD).as_deref() == Ok(test_name) {
        let dir = std::path::PathBuf::from(std::env::var(DIR).expect("sandbox dir"));
        body(&dir);
        std::fs::write(dir.join(format!("{test_name}.done")), b"ok").expect("marker file");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let sandbox = SoftHsmSandbox::create(dir.path(), token_label, "12345678", user_pin)
        .unwrap_or_else(|e| panic!("SoftHSM2 is required for this test (CI installs it): {e}"));
    let status = Command::new(std::env::current_exe().expect("test binary"))
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .envs(sandbox.env())
        .env(CHILD, test_name)
        .env(DIR, dir.path())
        .status()
        .expect("starting the SoftHSM2 child process");
    assert!(
        status.success(),
        "the SoftHSM2 child process for {test_name} failed"
    );
    assert!(
        dir.path().join(format!("{test_name}.done")).exists(),
        "the child process ran no test body"
    );
}

/// Errors out with an actionable message unless both the module and `softhsm2-util` exist.
pub fn check_installed() -> Result<()> {
    let util = Command::new("softhsm2-util").arg("--version").output();
    if !Path::new(SOFTHSM2_MODULE).exists() || util.is_err() {
        return Err(KeysError::Invalid(format!(
            "SoftHSM2 is not installed ({SOFTHSM2_MODULE} or softhsm2-util missing): apt-get install softhsm2"
        )));
    }
    Ok(())
}
