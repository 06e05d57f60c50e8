//! `cardpipe pki init | status | crl | rotate` and `cardpipe bench pki`.
//!
//! The CA keys live where `[pki]` says: an encrypted file keystore under `data_dir`
//! (embedded; passphrase from `pki.passphrase` / CARDPIPE__PKI__PASSPHRASE or generated
//! once into `data_dir`) or a PKCS#11 token (`keystore = "pkcs11"`; SoftHSM2 needs
//! SOFTHSM2_CONF in the environment before the process starts). The hierarchy itself
//! (certificates and key labels) is stored in the database (`ca_hierarchy`).

use std::sync::Arc;

use cardpipe_common::backends;
use cardpipe_common::clock;
use cardpipe_common::config::LoadedConfig;
use cardpipe_keys::ops::{self, RotationOutcome};
use cardpipe_pki::settings::{KeystoreKind, Pki, PkiConfig, Provisioning};
use clap::{Args, Subcommand};

/// `cardpipe pki ...`.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the CA hierarchy (root CA, citizen issuing CA, Document Signer) in the
    /// configured keystore and store it in the database; a no-op when one exists.
    Init,
    /// Show the hierarchy, each certificate's validity, whether the keystore holds its
    /// key, and usage counts (certificates, revocations, documents per DS, last CRL).
    Status,
    /// Generate and publish a CRL now (crl/issuing-<number>.crl and crl/latest.crl).
    Crl,
    /// Roll the Document Signer if the rotation policy says so (or now, with --force).
    Rotate {
        /// Rotate even if the policy does not call for it.
        #[arg(long)]
        force: bool,
    },
    /// Write the CA certificates (public, PEM) for relying parties and outside verifiers:
    /// root.pem, issuing.pem, document-signer.pem, each retired Document Signer, and
    /// chain.pem (issuing + root, for citizen certificates). No private key leaves the
    /// keystore. Prints each certificate's SHA-256 fingerprint.
    Export {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// `cardpipe bench pki`.
#[derive(Debug, Args)]
pub struct BenchPkiArgs {
    /// Credential sets to issue (2 key pairs + 2 certificates + LDS + EF.SOD + 2 wraps each).
    #[arg(long, default_value_t = 5000)]
    pub sets: usize,
    /// Sign with the PKCS#11 token of [pki] (pkcs11_module, pkcs11_token, pkcs11_pin) instead
    /// of a software keystore; throw-away `bench-*` keys are generated in the token. With
    /// SoftHSM2, SOFTHSM2_CONF must be set before cardpipe starts.
    #[arg(long)]
    pub hsm: bool,
    /// Create a throw-away SoftHSM2 token and run `--hsm` against it (re-runs cardpipe with
    /// SOFTHSM2_CONF set).
    #[arg(long, conflicts_with = "hsm")]
    pub softhsm_sandbox: bool,
}

/// Opens the backends and the PKI. `init` creates what is missing (the keystore, its
/// generated passphrase, the transport key, the hierarchy); the other subcommands, on a
/// distributed deployment's shared broker, open only what `init` made.
async fn open(
    loaded: &LoadedConfig,
    init: bool,
) -> anyhow::Result<(cardpipe_common::runtime::Services, Arc<Pki>)> {
    let config = &loaded.config;
    let services = backends::connect(config, clock::for_data_dir(&config.data_dir)?).await?;
    let provisioning = if init || config.broker.kind == cardpipe_common::config::BrokerKind::Memory
    {
        Provisioning::Create
    } else {
        Provisioning::OpenOnly
    };
    let pki = cardpipe_pki::settings::open_loaded_with(loaded, provisioning)?;
    Ok((services, pki))
}

/// Runs a `pki` subcommand.
pub async fn run(loaded: LoadedConfig, command: PkiCommand) -> anyhow::Result<()> {
    let (services, pki) = open(&loaded, matches!(command, PkiCommand::Init)).await?;
    match command {
        PkiCommand::Init => {
            let (current, created) = pki.init(&services).await?;
            if created {
                println!("CA hierarchy created ({})", current.hierarchy.backend);
            } else {
                println!(
                    "a CA hierarchy already exists (version {}); nothing created",
                    current.version
                );
            }
            print_status(&services, &pki).await?;
        }
        PkiCommand::Status => print_status(&services, &pki).await?,
        PkiCommand::Crl => {
            let crl = ops::publish_crl(&services, &pki).await?;
            println!(
                "CRL number {} published with {} revoked certificate(s): {} and {}",
                crl.number,
                crl.revoked,
                crl.object_key,
                ops::LATEST_CRL_KEY
            );
        }
        PkiCommand::Export { out } => export(&services, &out).await?,
        PkiCommand::Rotate { force } => {
            match ops::rotate_document_signer(&services, &pki, force).await? {
                RotationOutcome::Rotated { version, label } => {
                    println!("Document Signer rotated: hierarchy version {version}, key {label}")
                }
                other => println!("no rotation: {other:?}"),
            }
        }
    }
    services.store.close().await;
    Ok(())
}

async fn export(
    services: &cardpipe_common::runtime::Services,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    let Some((version, hierarchy)) =
        cardpipe_pki::store::current_hierarchy(&services.store).await?
    else {
        anyhow::bail!("no CA hierarchy yet: run `cardpipe pki init` first");
    };
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    let mut files: Vec<(String, &cardpipe_pki::ca::CaCertificate)> = vec![
        ("root.pem".into(), &hierarchy.root),
        ("issuing.pem".into(), &hierarchy.issuing),
        ("document-signer.pem".into(), &hierarchy.document_signer),
    ];
    for (i, ds) in hierarchy.retired_document_signers.iter().enumerate() {
        files.push((format!("document-signer-retired-{}.pem", i + 1), ds));
    }
    println!("CA certificates of hierarchy version {version}:");
    for (name, cert) in &files {
        let path = out.join(name);
        std::fs::write(&path, cert.pem()?)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!(
            "  {:<32} SHA-256 {}",
            path.display(),
            hex::encode_upper(cardpipe_pki::pkix::sha256(&cert.certificate))
        );
    }
    let chain = out.join("chain.pem");
    std::fs::write(&chain, hierarchy.chain_pem()?)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", chain.display()))?;
    println!("  {:<32} issuing + root", chain.display());
    Ok(())
}

async fn print_status(
    services: &cardpipe_common::runtime::Services,
    pki: &Pki,
) -> anyhow::Result<()> {
    let Some((version, hierarchy)) =
        cardpipe_pki::store::current_hierarchy(&services.store).await?
    else {
        println!(
            "no CA hierarchy yet: run `cardpipe pki init` (or start `cardpipe run` with pki.auto_init)"
        );
        return Ok(());
    };
    let usage =
        cardpipe_pki::store::usage_counts(&services.store, &hierarchy.document_signer.key_label)
            .await?;
    let report = cardpipe_pki::ca::status(
        pki.keystore().as_ref(),
        &hierarchy,
        usage,
        services.clock.now(),
    )?;
    println!("hierarchy version {version}");
    println!("{report}");
    for (v, reason, at) in cardpipe_pki::store::hierarchy_versions(&services.store).await? {
        println!("  version {v}: {reason} at {at}");
    }
    if let Some((n, at)) = cardpipe_pki::store::last_crl(&services.store).await? {
        println!("last CRL: number {n}, published {at}");
    }
    Ok(())
}

/// Runs `cardpipe bench pki`.
pub fn bench(loaded: &LoadedConfig, args: BenchPkiArgs) -> anyhow::Result<()> {
    if args.softhsm_sandbox {
        let dir = tempfile::tempdir()?;
        let sandbox = cardpipe_pki::keystore::softhsm::SoftHsmSandbox::create(
            dir.path(),
            "cardpipe-bench",
            "12345678",
            "1234",
        )?;
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "pki", "--hsm", "--sets", &args.sets.to_string()])
            .envs(sandbox.env())
            .env("CARDPIPE__PKI__KEYSTORE", "pkcs11")
            .env("CARDPIPE__PKI__PKCS11_TOKEN", "cardpipe-bench")
            .env("CARDPIPE__PKI__PKCS11_PIN", "1234")
            .status()?;
        anyhow::ensure!(status.success(), "the SoftHSM2 benchmark child failed");
        return Ok(());
    }
    let report = if args.hsm {
        let mut config = PkiConfig::from_loaded(loaded)?;
        config.keystore = KeystoreKind::Pkcs11;
        let store = config.open_keystore(&loaded.config.data_dir)?;
        cardpipe_pki::bench::run(store, args.sets)?
    } else {
        cardpipe_pki::bench::run_software(args.sets)?
    };
    println!("{report}");
    Ok(())
}
