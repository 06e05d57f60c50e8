//! The `[pki]` configuration section and [`Pki`], the keys stage's handle on the CA
//! hierarchy: which keystore holds the CA keys, the encoder site's transport key, and the
//! current hierarchy (persisted in the database, cached per version).
//!
//! Embedded defaults need no setup: with `keystore = "file"` and an empty `passphrase`, a
//! random passphrase is generated once into `data_dir/pki-keystore.passphrase` (mode
//! 0600), the keystore file is created under `data_dir`, and with `auto_init = true` the
//! first process to need the hierarchy creates it (`cardpipe pki init` does the same on
//! demand). An empty `transport_key_hex` likewise generates the simulated encoder site's
//! key into `data_dir/pki-transport-<transport_key_id>.key`.
//!
//! A long-running service of a distributed deployment (`cardpipe worker`, `cardpipe serve`
//! on a shared broker) opens this material but never creates it ([`Provisioning::OpenOnly`]):
//! replicas with a data_dir each would otherwise each generate a passphrase, a keystore and a
//! transport key of their own, and cards made under one replica's keys would not open under
//! another's. `cardpipe pki init` creates it once, from the same settings.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;
use cardpipe_common::runtime::Services;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::ca::{CaConfig, CaHierarchy};
use crate::citizen::CitizenProfiles;
use crate::custody::TransportKey;
use crate::issue::CardIssuer;
use crate::keystore::{CaKeyStore, FileKeyStore, KdfParams, Pkcs11Config, Pkcs11KeyStore};
use crate::rotation::RotationPolicy;
use crate::store;

/// Which keystore holds the CA keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeystoreKind {
    /// Encrypted file under `data_dir` (embedded mode).
    File,
    /// PKCS#11 token (HSM; SoftHSM2 in tests).
    Pkcs11,
}

/// Whether a process may create PKI material that is missing: the keystore file, its
/// generated passphrase, the generated transport key and the CA hierarchy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Provisioning {
    /// Create what is missing: embedded mode (`cardpipe run`) and `cardpipe pki init`.
    #[default]
    Create,
    /// Open only; anything missing is an error naming `cardpipe pki init`. Long-running
    /// services of a distributed deployment.
    OpenOnly,
}

/// The `[pki]` section of pipeline.toml.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PkiConfig {
    /// `file` or `pkcs11`.
    pub keystore: KeystoreKind,
    /// File keystore path (relative paths are under `data_dir`).
    pub keystore_path: PathBuf,
    /// File keystore passphrase; empty = generated into `passphrase_file`.
    pub passphrase: SecretString,
    /// Where the generated passphrase lives (relative paths are under `data_dir`).
    pub passphrase_file: PathBuf,
    /// scrypt cost (log2 N) for a new file keystore.
    pub kdf_log_n: u8,
    /// PKCS#11 module path.
    pub pkcs11_module: PathBuf,
    /// PKCS#11 token label.
    pub pkcs11_token: String,
    /// PKCS#11 user PIN.
    pub pkcs11_pin: SecretString,
    /// Create the hierarchy on first use when none is stored.
    pub auto_init: bool,
    /// CA subjects, validity, CRL distribution point of CA certificates.
    pub ca: CaConfig,
    /// Citizen certificate profiles (validity, key usages, CRL distribution point).
    pub citizen: CitizenProfiles,
    /// Document Signer rotation policy.
    pub rotation: RotationPolicy,
    /// Publish a CRL at least this often (seconds).
    pub crl_interval_seconds: u64,
    /// nextUpdate = thisUpdate + this many hours.
    pub crl_validity_hours: u64,
    /// Transport key id of the encoder site (recorded in every wrapped key).
    pub transport_key_id: String,
    /// The transport key, 64 hex digits; empty = generated into `data_dir`.
    pub transport_key_hex: SecretString,
    /// Whether missing material may be created: set by the command opening the PKI, not a
    /// configuration key.
    #[serde(skip)]
    pub provisioning: Provisioning,
}

impl std::fmt::Debug for PkiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PkiConfig")
            .field("keystore", &self.keystore)
            .field("keystore_path", &self.keystore_path)
            .field("pkcs11_module", &self.pkcs11_module)
            .field("pkcs11_token", &self.pkcs11_token)
            .field("auto_init", &self.auto_init)
            .field("rotation", &self.rotation)
            .field("crl_interval_seconds", &self.crl_interval_seconds)
            .field("transport_key_id", &self.transport_key_id)
            .field("provisioning", &self.provisioning)
            .finish_non_exhaustive()
    }
}

impl Default for PkiConfig {
    fn default() -> Self {
        Self {
            keystore: KeystoreKind::File,
            keystore_path: "pki/ca.keystore".into(),
            passphrase: SecretString::from(""),
            passphrase_file: "pki-keystore.passphrase".into(),
            kdf_log_n: KdfParams::default().log_n,
            pkcs11_module: crate::keystore::softhsm::SOFTHSM2_MODULE.into(),
            pkcs11_token: "cardpipe".into(),
            pkcs11_pin: SecretString::from(""),
            auto_init: true,
            ca: CaConfig::default(),
            citizen: CitizenProfiles::default(),
            rotation: RotationPolicy::default(),
            crl_interval_seconds: 3600,
            crl_validity_hours: 48,
            transport_key_id: "encoder-site-01".into(),
            transport_key_hex: SecretString::from(""),
            provisioning: Provisioning::Create,
        }
    }
}

impl PkiConfig {
    /// Reads `[pki]` from the loaded configuration (defaults when absent).
    pub fn from_loaded(loaded: &cardpipe_common::config::LoadedConfig) -> anyhow::Result<Self> {
        let config: Self = loaded.section("pki").map_err(|errors| {
            anyhow::anyhow!(
                "[pki] configuration: {}",
                cardpipe_common::config::describe(&errors)
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Rules beyond the types.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.rotation.validate().context("pki.rotation")?;
        anyhow::ensure!(
            self.crl_interval_seconds > 0,
            "pki.crl_interval_seconds must be > 0"
        );
        anyhow::ensure!(
            self.crl_validity_hours * 3600 > self.crl_interval_seconds,
            "pki.crl_validity_hours must cover more than one crl_interval_seconds"
        );
        anyhow::ensure!(
            !self.transport_key_id.is_empty(),
            "pki.transport_key_id must not be empty"
        );
        if self.keystore == KeystoreKind::Pkcs11 {
            anyhow::ensure!(
                !self.pkcs11_pin.expose_secret().is_empty(),
                "pki.pkcs11_pin is required with keystore = \"pkcs11\""
            );
        }
        Ok(())
    }

    fn under(data_dir: &Path, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            data_dir.join(path)
        }
    }

    /// Opens (or creates) the configured keystore.
    pub fn open_keystore(&self, data_dir: &Path) -> anyhow::Result<Arc<dyn CaKeyStore>> {
        match self.keystore {
            KeystoreKind::File => {
                let passphrase = if self.passphrase.expose_secret().is_empty() {
                    let path = Self::under(data_dir, &self.passphrase_file);
                    self.may_create(
                        &path,
                        "the file keystore's passphrase",
                        "pki.passphrase (CARDPIPE__PKI__PASSPHRASE)",
                    )?;
                    read_or_generate_secret(&path, || {
                        let mut bytes = [0u8; 32];
                        openssl::rand::rand_bytes(&mut bytes)?;
                        Ok(hex::encode(bytes))
                    })?
                } else {
                    self.passphrase.clone()
                };
                let path = Self::under(data_dir, &self.keystore_path);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                let params = KdfParams {
                    log_n: self.kdf_log_n,
                    ..KdfParams::default()
                };
                let store = match self.provisioning {
                    Provisioning::Create => {
                        FileKeyStore::open_or_create(&path, &passphrase, params)
                    }
                    Provisioning::OpenOnly => {
                        self.may_create(
                            &path,
                            "the CA keystore",
                            "pki.keystore_path to the keystore `pki init` wrote (on a volume \
                             every replica mounts)",
                        )?;
                        FileKeyStore::open(&path, &passphrase)
                    }
                }
                .with_context(|| format!("opening the file keystore {}", path.display()))?;
                Ok(Arc::new(store))
            }
            KeystoreKind::Pkcs11 => {
                let store = Pkcs11KeyStore::open(&Pkcs11Config {
                    module: self.pkcs11_module.clone(),
                    token_label: self.pkcs11_token.clone(),
                    pin: self.pkcs11_pin.clone(),
                })
                .with_context(|| {
                    format!(
                        "opening PKCS#11 token {:?} with {} (SoftHSM2 needs SOFTHSM2_CONF set before the process starts)",
                        self.pkcs11_token,
                        self.pkcs11_module.display()
                    )
                })?;
                Ok(Arc::new(store))
            }
        }
    }

    /// The encoder site's transport key (generated into `data_dir` when not configured).
    pub fn transport_key(&self, data_dir: &Path) -> anyhow::Result<TransportKey> {
        let hex_key = if self.transport_key_hex.expose_secret().is_empty() {
            let path = data_dir.join(format!(
                "pki-transport-{}.key",
                self.transport_key_id.replace(['/', '\\'], "_")
            ));
            self.may_create(
                &path,
                "the encoder site's transport key",
                "pki.transport_key_hex (CARDPIPE__PKI__TRANSPORT_KEY_HEX)",
            )?;
            read_or_generate_secret(&path, || {
                let mut bytes = [0u8; 32];
                openssl::rand::rand_bytes(&mut bytes)?;
                Ok(hex::encode(bytes))
            })?
        } else {
            self.transport_key_hex.clone()
        };
        TransportKey::from_hex(self.transport_key_id.clone(), &hex_key)
            .context("pki.transport_key_hex")
    }
}

impl PkiConfig {
    /// With [`Provisioning::OpenOnly`], refuses to go on when `path` does not exist (it
    /// would be generated for this process alone), naming what to run or set instead.
    fn may_create(&self, path: &Path, what: &str, setting: &str) -> anyhow::Result<()> {
        if self.provisioning == Provisioning::OpenOnly && !path.exists() {
            anyhow::bail!(
                "{what} is missing ({} does not exist) and a service of a distributed \
                 deployment does not generate PKI material (each replica would have its own): \
                 run `cardpipe pki init` once with the same settings (compose: the pki-init \
                 service), or set {setting}",
                path.display()
            );
        }
        Ok(())
    }
}

fn read_or_generate_secret(
    path: &Path,
    generate: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<SecretString> {
    if !path.exists() {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let value = zeroize::Zeroizing::new(generate()?);
        match write_private(path, &value) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "generated an embedded-mode PKI secret")
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    Ok(SecretString::from(text.trim().to_owned()))
}

/// Creates `path` with `contents` (mode 0600) unless it exists (`AlreadyExists`). Written to
/// a private temporary file and linked into place, so processes starting together in one
/// data_dir never read a half-written secret: the first link wins, the others read it.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("secret"),
        uuid::Uuid::new_v4().simple()
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()));
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    linked
}

/// The hierarchy version in use and an issuer built for it.
#[derive(Debug)]
pub struct CurrentCa {
    /// `ca_hierarchy.version`.
    pub version: i64,
    /// The hierarchy.
    pub hierarchy: CaHierarchy,
    /// Issues credential sets under it.
    pub issuer: CardIssuer,
}

/// The keys stage's PKI handle: keystore, transport key, configuration, cached hierarchy.
pub struct Pki {
    /// Configuration.
    pub config: PkiConfig,
    keystore: Arc<dyn CaKeyStore>,
    transport: TransportKey,
    current: RwLock<Option<Arc<CurrentCa>>>,
    init_lock: tokio::sync::Mutex<()>,
    holder: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("backend", &self.keystore.backend())
            .field("transport_key", &self.transport)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Opens the configured keystore and transport key.
    pub fn open(config: PkiConfig, data_dir: &Path) -> anyhow::Result<Self> {
        config.validate()?;
        let keystore = config.open_keystore(data_dir)?;
        let transport = config.transport_key(data_dir)?;
        Ok(Self::with_keystore(config, keystore, transport))
    }

    /// A handle over an already open keystore (tests, benchmarks, HSM sessions).
    pub fn with_keystore(
        config: PkiConfig,
        keystore: Arc<dyn CaKeyStore>,
        transport: TransportKey,
    ) -> Self {
        Self {
            config,
            keystore,
            transport,
            current: RwLock::new(None),
            init_lock: tokio::sync::Mutex::new(()),
            holder: format!(
                "keys-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }

    /// The keystore.
    pub fn keystore(&self) -> &Arc<dyn CaKeyStore> {
        &self.keystore
    }

    /// The transport key packages are wrapped under.
    pub fn transport_key(&self) -> &TransportKey {
        &self.transport
    }

    /// Lease holder name of this handle.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Creates the hierarchy if none is stored (exactly once across replicas: the version-1
    /// row is unique). Returns the stored version and whether this call created it.
    pub async fn init(&self, services: &Services) -> anyhow::Result<(Arc<CurrentCa>, bool)> {
        let _one_at_a_time = self.init_lock.lock().await;
        if let Some((version, hierarchy)) = store::current_hierarchy(&services.store).await? {
            return Ok((self.install(version, hierarchy)?, false));
        }
        let now = services.clock.now();
        let holder_ok = services
            .store
            .try_lease("pki-init", &self.holder, now, time::Duration::minutes(5))
            .await?;
        if !holder_ok {
            anyhow::bail!("another process is initialising the CA hierarchy; retry shortly");
        }
        // Re-check under the lease.
        if let Some((version, hierarchy)) = store::current_hierarchy(&services.store).await? {
            services
                .store
                .release_lease("pki-init", &self.holder)
                .await?;
            return Ok((self.install(version, hierarchy)?, false));
        }
        let keystore = self.keystore.clone();
        let ca = self.config.ca.clone();
        let hierarchy =
            tokio::task::spawn_blocking(move || crate::ca::init(keystore.as_ref(), &ca, now))
                .await??;
        let created = store::insert_hierarchy(&services.store, 1, &hierarchy, "init", now).await?;
        if created {
            // Every PKI operation is its own audit entry.
            cardpipe_common::audit::record(
                &services.store,
                services.clock.as_ref(),
                &cardpipe_common::audit::AuditEvent {
                    actor: &format!("system:{}", self.holder),
                    role: "system",
                    action: "pki.init",
                    subject: "ca-hierarchy-1",
                    details: serde_json::json!({
                        "backend": hierarchy.backend,
                        "document_signer": hierarchy.document_signer.key_label,
                    }),
                },
            )
            .await?;
        }
        services
            .store
            .release_lease("pki-init", &self.holder)
            .await?;
        let (version, hierarchy) = store::current_hierarchy(&services.store)
            .await?
            .context("the CA hierarchy vanished after init")?;
        Ok((self.install(version, hierarchy)?, created))
    }

    fn install(&self, version: i64, hierarchy: CaHierarchy) -> anyhow::Result<Arc<CurrentCa>> {
        let issuer = CardIssuer::new(self.keystore.clone(), &hierarchy, &self.config.citizen)?;
        let current = Arc::new(CurrentCa {
            version,
            hierarchy,
            issuer,
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(current.clone());
        Ok(current)
    }

    /// The current hierarchy (re-read when another replica stored a newer version);
    /// initialises it when none exists and `auto_init` is on.
    pub async fn current(&self, services: &Services) -> anyhow::Result<Arc<CurrentCa>> {
        let latest = store::current_hierarchy_version(&services.store).await?;
        let cached = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match (latest, cached) {
            (Some(v), Some(c)) if c.version == v => Ok(c),
            (Some(_), _) => {
                let (version, hierarchy) = store::current_hierarchy(&services.store)
                    .await?
                    .context("CA hierarchy missing")?;
                self.install(version, hierarchy)
            }
            (None, _)
                if self.config.auto_init && self.config.provisioning == Provisioning::Create =>
            {
                Ok(self.init(services).await?.0)
            }
            (None, _) if self.config.provisioning == Provisioning::OpenOnly => anyhow::bail!(
                "no CA hierarchy: a service of a distributed deployment does not create one; \
                 run `cardpipe pki init` once (compose: the pki-init service)"
            ),
            (None, _) => anyhow::bail!(
                "no CA hierarchy: run `cardpipe pki init` (or set pki.auto_init = true)"
            ),
        }
    }
}

/// Opens the [`Pki`] `loaded` configures (creating `data_dir` if needed). A process opens it
/// once and shares the handle (the `cardpipe` binary's context does), so a key generated by
/// a rotation is at once usable by the keys stage.
pub fn open_loaded(loaded: &cardpipe_common::config::LoadedConfig) -> anyhow::Result<Arc<Pki>> {
    open_loaded_with(loaded, Provisioning::Create)
}

/// [`open_loaded`], creating missing material only if `provisioning` allows it.
pub fn open_loaded_with(
    loaded: &cardpipe_common::config::LoadedConfig,
    provisioning: Provisioning,
) -> anyhow::Result<Arc<Pki>> {
    let mut config = PkiConfig::from_loaded(loaded)?;
    config.provisioning = provisioning;
    std::fs::create_dir_all(&loaded.config.data_dir)
        .with_context(|| format!("creating data_dir {}", loaded.config.data_dir.display()))?;
    Ok(Arc::new(Pki::open(config, &loaded.config.data_dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(provisioning: Provisioning) -> PkiConfig {
        PkiConfig {
            kdf_log_n: 10, // fast in tests
            provisioning,
            ..PkiConfig::default()
        }
    }

    fn message(e: anyhow::Error) -> String {
        format!("{e:#}")
    }

    /// Open-only finds nothing to open in a fresh data_dir: each piece is refused, named,
    /// with what to run, and nothing is written.
    #[test]
    fn open_only_refuses_to_generate_and_names_pki_init() {
        let dir = tempfile::tempdir().unwrap();
        let open_only = config(Provisioning::OpenOnly);
        let err = message(open_only.open_keystore(dir.path()).err().unwrap());
        assert!(err.contains("the file keystore's passphrase"), "{err}");
        assert!(err.contains("cardpipe pki init"), "{err}");
        assert!(err.contains("CARDPIPE__PKI__PASSPHRASE"), "{err}");
        let err = message(open_only.transport_key(dir.path()).err().unwrap());
        assert!(err.contains("transport key"), "{err}");
        assert!(err.contains("CARDPIPE__PKI__TRANSPORT_KEY_HEX"), "{err}");
        // With the passphrase configured, the keystore itself is still not created.
        let mut with_passphrase = config(Provisioning::OpenOnly);
        with_passphrase.passphrase = SecretString::from("a shared passphrase");
        let err = message(with_passphrase.open_keystore(dir.path()).err().unwrap());
        assert!(err.contains("the CA keystore"), "{err}");
        assert!(err.contains("cardpipe pki init"), "{err}");
        let mut left = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                left.push(path);
            }
        }
        assert!(left.is_empty(), "files written: {left:?}");
    }

    /// What `pki init` (Create) made, an open-only process opens: the same transport key and
    /// the keystore with the same keys.
    #[test]
    fn open_only_opens_what_create_made() {
        let dir = tempfile::tempdir().unwrap();
        let created = config(Provisioning::Create);
        created.open_keystore(dir.path()).unwrap();
        created.transport_key(dir.path()).unwrap();
        let mut before = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                before.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
        assert!(
            before.len() >= 2,
            "passphrase and transport key: {before:?}"
        );
        let open_only = config(Provisioning::OpenOnly);
        open_only.open_keystore(dir.path()).unwrap();
        open_only.transport_key(dir.path()).unwrap();
        for (path, bytes) in before {
            assert_eq!(
                std::fs::read(&path).unwrap(),
                bytes,
                "{} changed",
                path.display()
            );
        }
    }
}
