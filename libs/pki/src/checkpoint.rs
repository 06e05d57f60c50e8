//! Signed checkpoints of the audit chain: what makes the log hard to rewrite for whoever owns
//! the database.
//!
//! The audit chain ([`cardpipe_common::audit`]) is an unkeyed hash chain: anyone who can write
//! the tables can cut its tail or recompute it from an edited entry on. A checkpoint is the
//! chain's last sequence number and hash, signed (ECDSA P-256) with a key that lives in the CA
//! keystore or HSM — never in the database — and written to the object store as
//! `audit/checkpoints/<seq, 20 digits>.json`. `cardpipe audit verify` then checks the chain
//! against the newest checkpoint: a log that ends before it, or holds another hash at its
//! position, fails, and so does a checkpoint whose signature does not verify.
//!
//! Checkpoints are written every `[audit] checkpoint_interval_seconds` by the process that
//! serves the API (and at its shutdown); a pass whose head is already checkpointed writes
//! nothing. Before signing, the writer checks every entry since the newest valid checkpoint
//! (hash, link, no gap) and that the checkpointed entry still carries its hash: a chain
//! changed behind its back is refused (metric outcome `refused`), never signed. What they cannot cover: entries appended after the newest checkpoint (at most one
//! interval's worth), and someone who also controls the object store and deletes checkpoints
//! (an object-lock / WORM bucket for the `audit/` prefix closes that: deploy/README.md).
//!
//! The signing key is `audit-checkpoint-<n>`, the highest `n` in the keystore; it is created
//! on first use, and `cardpipe audit rotate-key` adds the next one (old checkpoints still
//! verify under the key they name).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use cardpipe_common::audit::{self, Anchor};
use cardpipe_common::clock::to_rfc3339;
use cardpipe_common::runtime::Services;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::KeysError;
use crate::keystore::CaKeyStore;
use crate::pkix::{PublicKey, sha256};

/// Object-store prefix of the checkpoints.
pub const PREFIX: &str = "audit/checkpoints/";
/// Keystore label prefix of the signing keys.
pub const KEY_PREFIX: &str = "audit-checkpoint-";
/// Format tag, inside the signed bytes.
pub const FORMAT: &str = "cardpipe-audit-checkpoint/1";

/// One stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCheckpoint {
    /// [`FORMAT`].
    pub format: String,
    /// The audit entry vouched for.
    pub seq: i64,
    /// Its hash.
    pub hash: String,
    /// When it was signed (RFC 3339 UTC).
    pub at: String,
    /// Keystore label of the signing key.
    pub key_label: String,
    /// DER ECDSA signature over SHA-256 of [`SignedCheckpoint::signed_bytes`], base64.
    pub signature: String,
}

impl SignedCheckpoint {
    /// The bytes the signature covers: a JSON array of every other field (unambiguous).
    pub fn signed_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&(
            &self.format,
            self.seq,
            &self.hash,
            &self.at,
            &self.key_label,
        ))
        .expect("strings and integers always serialise")
    }

    /// The chain point it vouches for.
    pub fn anchor(&self) -> Anchor {
        Anchor {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }

    /// Where it is stored.
    pub fn object_key(&self) -> String {
        object_key(self.seq)
    }
}

/// Object key of the checkpoint of entry `seq`.
pub fn object_key(seq: i64) -> String {
    format!("{PREFIX}{seq:020}.json")
}

fn key_number(label: &str) -> Option<u32> {
    label.strip_prefix(KEY_PREFIX)?.parse().ok()
}

/// The label of the current signing key, if any.
pub fn current_key(keystore: &dyn CaKeyStore) -> anyhow::Result<Option<String>> {
    let newest = keystore
        .list()
        .context("listing the keystore")?
        .into_iter()
        .filter_map(|k| key_number(&k.label))
        .max();
    Ok(newest.map(|n| format!("{KEY_PREFIX}{n}")))
}

/// Adds the next signing key (`audit-checkpoint-<n+1>`) and returns its label.
pub fn rotate_key(keystore: &dyn CaKeyStore) -> anyhow::Result<String> {
    let next = current_key(keystore)?
        .as_deref()
        .and_then(key_number)
        .map_or(1, |n| n + 1);
    let label = format!("{KEY_PREFIX}{next}");
    keystore
        .generate(&label)
        .with_context(|| format!("generating the audit checkpoint key {label}"))?;
    Ok(label)
}

/// The current signing key, created on first use (a replica racing to create it too is fine:
/// the keystore refuses the second, and both then use the one stored).
fn signing_key(keystore: &dyn CaKeyStore) -> anyhow::Result<String> {
    if let Some(label) = current_key(keystore)? {
        return Ok(label);
    }
    let label = format!("{KEY_PREFIX}1");
    match keystore.generate(&label) {
        Ok(_) | Err(KeysError::KeyExists(_)) => Ok(label),
        Err(e) => Err(e).context("generating the audit checkpoint key"),
    }
}

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The chain no longer extends the newest checkpoint: signing its head now would vouch
    /// for a rewritten log. Nothing is signed until an auditor has looked.
    #[error(
        "the audit chain no longer extends the checkpoint of entry {checkpoint_seq}: {problem}; not signing (run `cardpipe audit verify`)"
    )]
    Tampered {
        /// The newest valid checkpoint.
        checkpoint_seq: i64,
        /// The first problem found.
        problem: String,
    },
    /// Anything else (store, object store, keystore).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Signs the chain's head and stores the checkpoint, after checking that the chain still
/// extends the newest valid checkpoint (hashes and links of every entry since). `None` when
/// the log is empty or its head already has a checkpoint.
pub async fn write(
    services: &Services,
    keystore: &Arc<dyn CaKeyStore>,
) -> Result<Option<SignedCheckpoint>, WriteError> {
    let found = newest(services, keystore.as_ref()).await?;
    let from = found.newest.as_ref().map_or(
        Anchor {
            seq: 0,
            hash: audit::GENESIS_HASH.to_owned(),
        },
        SignedCheckpoint::anchor,
    );
    let report = audit::verify_extends(&services.store, &from)
        .await
        .context("reading the audit chain")?;
    if let Some(problem) = report.problems.first() {
        return Err(WriteError::Tampered {
            checkpoint_seq: from.seq,
            problem: problem.to_string(),
        });
    }
    let head = report.end.unwrap_or(from);
    if head.seq == 0 {
        return Ok(None);
    }
    let key = object_key(head.seq);
    if services
        .objects
        .get(&key)
        .await
        .context("reading the audit checkpoints")?
        .is_some()
    {
        return Ok(None);
    }
    let mut checkpoint = SignedCheckpoint {
        format: FORMAT.to_owned(),
        seq: head.seq,
        hash: head.hash,
        at: to_rfc3339(services.clock.now()),
        key_label: String::new(),
        signature: String::new(),
    };
    let keystore = keystore.clone();
    let checkpoint = tokio::task::spawn_blocking(move || -> anyhow::Result<SignedCheckpoint> {
        checkpoint.key_label = signing_key(keystore.as_ref())?;
        let digest = sha256(&checkpoint.signed_bytes());
        let signature = keystore
            .sign_digest(&checkpoint.key_label, &digest)
            .context("signing the audit checkpoint")?;
        checkpoint.signature = base64::engine::general_purpose::STANDARD.encode(signature);
        Ok(checkpoint)
    })
    .await
    .context("the signing task")??;
    let body = serde_json::to_vec_pretty(&checkpoint).context("encoding the checkpoint")?;
    services
        .objects
        .put(&key, Bytes::from(body))
        .await
        .with_context(|| format!("storing the audit checkpoint {key}"))?;
    Ok(Some(checkpoint))
}

/// [`write`], counted in the metrics and logged; never fails the caller.
pub async fn write_logged(services: &Services, keystore: &Arc<dyn CaKeyStore>) {
    match write(services, keystore).await {
        Ok(Some(c)) => {
            services.metrics.audit_checkpoint("written", Some(c.seq));
            tracing::info!(seq = c.seq, key = %c.key_label, "audit checkpoint written");
        }
        Ok(None) => services.metrics.audit_checkpoint("unchanged", None),
        Err(err @ WriteError::Tampered { .. }) => {
            services.metrics.audit_checkpoint("refused", None);
            tracing::error!(error = %err, "audit checkpoint refused: the chain was changed");
        }
        Err(err) => {
            services.metrics.audit_checkpoint("failed", None);
            tracing::error!(error = %format!("{err:#}"), "audit checkpoint not written");
        }
    }
}

/// Writes a checkpoint every `interval` until `stop`, then one last time.
pub async fn run_schedule(
    services: Services,
    keystore: Arc<dyn CaKeyStore>,
    interval: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => write_logged(&services, &keystore).await,
            _ = stop.cancelled() => break,
        }
    }
    Ok(())
}

/// Why a stored checkpoint cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadCheckpoint {
    /// Its object key.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for BadCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "checkpoint {}: {}", self.key, self.reason)
    }
}

/// Where the public halves of the checkpoint keys come from: the keystore itself, or files
/// exported with `cardpipe audit export-keys` (an auditor needs no access to the HSM).
pub enum Verifier<'a> {
    /// The CA keystore / HSM.
    Keystore(&'a dyn CaKeyStore),
    /// Exported public keys by label.
    Exported(std::collections::BTreeMap<String, PublicKey>),
}

impl std::fmt::Debug for Verifier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verifier::Keystore(k) => write!(f, "Verifier::Keystore({})", k.backend()),
            Verifier::Exported(keys) => write!(f, "Verifier::Exported({:?})", keys.keys()),
        }
    }
}

impl Verifier<'_> {
    fn public_key(&self, label: &str) -> Result<PublicKey, String> {
        match self {
            Verifier::Keystore(keystore) => keystore
                .public_key(label)
                .map_err(|e| format!("its key {label} is not in the keystore ({e})")),
            Verifier::Exported(keys) => keys
                .get(label)
                .cloned()
                .ok_or_else(|| format!("its key {label} is not among the exported keys")),
        }
    }

    /// Reads every `audit-checkpoint-<n>.pem` (SubjectPublicKeyInfo) in `dir`.
    pub fn from_dir(dir: &std::path::Path) -> anyhow::Result<Verifier<'static>> {
        use der::Decode as _;
        let mut keys = std::collections::BTreeMap::new();
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let Some(label) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pem"))
                .filter(|n| key_number(n).is_some())
                .map(str::to_owned)
            else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let (pem_label, der) = der::pem::decode_vec(text.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: not PEM ({e})", path.display()))?;
            anyhow::ensure!(
                pem_label == "PUBLIC KEY",
                "{}: a {pem_label}, not a PUBLIC KEY",
                path.display()
            );
            let spki = spki::SubjectPublicKeyInfoOwned::from_der(&der)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            keys.insert(label, PublicKey::from_spki(&spki)?);
        }
        anyhow::ensure!(
            !keys.is_empty(),
            "no audit-checkpoint-<n>.pem in {} (cardpipe audit export-keys writes them)",
            dir.display()
        );
        Ok(Verifier::Exported(keys))
    }
}

/// Writes the public half of every checkpoint key as `<dir>/audit-checkpoint-<n>.pem`
/// (SubjectPublicKeyInfo PEM): what an auditor verifies checkpoints with.
pub fn export_public_keys(
    keystore: &dyn CaKeyStore,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use der::Encode as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for key in keystore.list().context("listing the keystore")? {
        if key_number(&key.label).is_none() {
            continue;
        }
        let der = key
            .public_key
            .to_spki()?
            .to_der()
            .map_err(|e| anyhow::anyhow!("encoding {}: {e}", key.label))?;
        let path = dir.join(format!("{}.pem", key.label));
        std::fs::write(&path, crate::pkix::to_pem("PUBLIC KEY", &der)?)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Reads one stored checkpoint and checks its signature and its place.
fn check(key: &str, body: &[u8], verifier: &Verifier<'_>) -> Result<SignedCheckpoint, String> {
    let checkpoint: SignedCheckpoint =
        serde_json::from_slice(body).map_err(|e| format!("not a checkpoint ({e})"))?;
    if checkpoint.format != FORMAT {
        return Err(format!("unknown format {:?}", checkpoint.format));
    }
    if checkpoint.object_key() != key {
        return Err(format!(
            "names entry {} but is stored under another name (moved)",
            checkpoint.seq
        ));
    }
    if key_number(&checkpoint.key_label).is_none() {
        return Err(format!(
            "names {:?}, which is not an audit checkpoint key",
            checkpoint.key_label
        ));
    }
    let public = verifier.public_key(&checkpoint.key_label)?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(&checkpoint.signature)
        .map_err(|_| "the signature is not base64".to_owned())?;
    let digest = sha256(&checkpoint.signed_bytes());
    match public.verify_digest(&digest, &signature) {
        Ok(true) => Ok(checkpoint),
        _ => Err(format!(
            "the signature does not verify under {} (forged or altered)",
            checkpoint.key_label
        )),
    }
}

/// What [`newest`] found in the object store.
#[derive(Debug, Default)]
pub struct Found {
    /// The newest checkpoint whose signature verifies.
    pub newest: Option<SignedCheckpoint>,
    /// Checkpoints newer than it that do not verify (each one a problem).
    pub bad: Vec<BadCheckpoint>,
    /// How many checkpoints are stored.
    pub stored: usize,
}

/// The newest checkpoint that verifies under the keystore's keys, and every newer one that
/// does not.
pub async fn newest(services: &Services, keystore: &dyn CaKeyStore) -> anyhow::Result<Found> {
    newest_with(services, &Verifier::Keystore(keystore)).await
}

/// [`newest`], with the public keys from `verifier`.
pub async fn newest_with(services: &Services, verifier: &Verifier<'_>) -> anyhow::Result<Found> {
    let keys = services
        .objects
        .list(PREFIX)
        .await
        .context("listing the audit checkpoints")?;
    let mut found = Found {
        stored: keys.len(),
        ..Found::default()
    };
    for key in keys.iter().rev() {
        // Bounded: a checkpoint is a few hundred bytes.
        let checked = match services.objects.get_bounded(key, 64 * 1024).await {
            Ok(Some(body)) => check(key, &body, verifier),
            Ok(None) => continue,
            Err(cardpipe_common::objects::ObjectError::TooLarge { .. }) => {
                Err("larger than any checkpoint".to_owned())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {key}")),
        };
        match checked {
            Ok(checkpoint) => {
                found.newest = Some(checkpoint);
                break;
            }
            Err(reason) => found.bad.push(BadCheckpoint {
                key: key.clone(),
                reason,
            }),
        }
    }
    Ok(found)
}
