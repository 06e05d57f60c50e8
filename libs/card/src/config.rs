//! The `[encoders]` section: which encoders the farm drives (in-process simulator or PC/SC
//! readers), the SCP03 master keys, the encoder site's transport key and the transport PINs
//! written to new cards, fault injection for the simulator, and the farm built from it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cardpipe_pki::custody::TransportKey;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::card_os::Faults;
use crate::farm::{Farm, FarmSettings, InProcessSource, PcscSource};
use crate::reader::BlankStock;
use crate::scp03::MasterKeys;
use crate::script::{self, ScriptOptions};

/// The configuration section.
pub const SECTION: &str = "encoders";

/// Which encoders the farm drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    /// The card OS in this process (embedded mode).
    #[default]
    InProcess,
    /// PC/SC readers through pcscd.
    Pcsc,
}

/// `[encoders]` in pipeline.toml.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncodersConfig {
    /// `in_process` or `pcsc`.
    pub kind: EncoderKind,
    /// In-process encoders to create.
    pub count: usize,
    /// Simulated encode time per card (slow EEPROM), ms; 0 = as fast as the CPU.
    pub encode_time_ms: u64,
    /// In-process blanks: share with a dead chip.
    pub dead_rate: f64,
    /// In-process blanks: share pulled out mid-write.
    pub tear_rate: f64,
    /// In-process blanks: per-write failure probability.
    pub write_failure_rate: f64,
    /// SCP03 master keys enc ‖ mac ‖ dek, hex (3 × 16, 24 or 32 bytes); empty = the
    /// simulator's test keys.
    pub master_keys_hex: SecretString,
    /// Transport key id (must match `[pki] transport_key_id`).
    pub transport_key_id: String,
    /// Transport key, 64 hex digits; empty = `data_dir/pki-transport-<id>.key`.
    pub transport_key_hex: SecretString,
    /// Transport ID PIN.
    pub transport_id_pin: SecretString,
    /// Transport signature PIN.
    pub transport_sign_pin: SecretString,
    /// Transport PUK.
    pub transport_puk: SecretString,
    /// Spoiled blanks per application before it is parked.
    pub max_blanks: u32,
    /// Failures in a row that take an encoder out of service.
    pub max_consecutive_failures: u32,
    /// Reader re-scan period, ms.
    pub rescan_interval_ms: u64,
    /// How long a job waits for a free encoder, ms.
    pub acquire_timeout_ms: u64,
    /// How long a PC/SC insert waits for a card, ms.
    pub insert_timeout_ms: u64,
    /// Extended length APDUs (4 KiB chunks) instead of short ones.
    pub extended_length: bool,
    /// PC/SC readers that are not encoders: names starting with any of these are skipped
    /// (the QC stations of `cardpipe encoders simulate --qc-stations`).
    pub skip_readers: Vec<String>,
    /// Lab only: let a deployment with real encoders, an HSM or distributed backends use
    /// the built-in test secrets (the simulator's SCP03 keys, the default transport PINs).
    /// `cardpipe config check` and every process start refuse them otherwise.
    pub allow_test_secrets: bool,
}

impl Default for EncodersConfig {
    fn default() -> Self {
        Self {
            kind: EncoderKind::InProcess,
            count: 4,
            encode_time_ms: 0,
            dead_rate: 0.0,
            tear_rate: 0.0,
            write_failure_rate: 0.0,
            master_keys_hex: SecretString::from(""),
            transport_key_id: "encoder-site-01".into(),
            transport_key_hex: SecretString::from(""),
            transport_id_pin: SecretString::from("123456"),
            transport_sign_pin: SecretString::from("654321"),
            transport_puk: SecretString::from("12345678"),
            max_blanks: 3,
            max_consecutive_failures: 5,
            rescan_interval_ms: 2000,
            acquire_timeout_ms: 30_000,
            insert_timeout_ms: 5000,
            extended_length: true,
            skip_readers: vec!["QC Station".into()],
            allow_test_secrets: false,
        }
    }
}

impl std::fmt::Debug for EncodersConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodersConfig")
            .field("kind", &self.kind)
            .field("count", &self.count)
            .field("encode_time_ms", &self.encode_time_ms)
            .field("transport_key_id", &self.transport_key_id)
            .field("max_blanks", &self.max_blanks)
            .finish_non_exhaustive()
    }
}

/// Built-in transport PINs (ID PIN, signature PIN, PUK): fine for the simulator, public.
const TEST_PINS: [(&str, &str); 3] = [
    ("encoders.transport_id_pin", "123456"),
    ("encoders.transport_sign_pin", "654321"),
    ("encoders.transport_puk", "12345678"),
];

impl EncodersConfig {
    /// The keys of this section that hold a built-in test secret (never the values): an
    /// empty `master_keys_hex` or one spelling the simulator's SCP03 test keys, and the
    /// default transport PINs. A deployment with real encoders, an HSM or distributed
    /// backends must not run with any of them (issue 14: the test keys are public, so anyone
    /// could open a secure channel to the cards).
    pub fn test_secrets_in_use(&self) -> Vec<&'static str> {
        let mut found = Vec::new();
        let keys_hex = self.master_keys_hex.expose_secret().trim();
        let test_keys = keys_hex.is_empty()
            || self
                .master_keys()
                .is_ok_and(|k| k == MasterKeys::test_keys());
        if test_keys {
            found.push("encoders.master_keys_hex");
        }
        let pins = [
            &self.transport_id_pin,
            &self.transport_sign_pin,
            &self.transport_puk,
        ];
        for ((key, builtin), pin) in TEST_PINS.iter().zip(pins) {
            if pin.expose_secret() == *builtin {
                found.push(key);
            }
        }
        found
    }

    /// The SCP03 master keys.
    pub fn master_keys(&self) -> anyhow::Result<MasterKeys> {
        let hex_keys = self.master_keys_hex.expose_secret().trim();
        if hex_keys.is_empty() {
            return Ok(MasterKeys::test_keys());
        }
        let raw = Zeroizing::new(
            hex::decode(hex_keys)
                .map_err(|_| anyhow::anyhow!("encoders.master_keys_hex is not hex"))?,
        );
        let n = raw.len() / 3;
        if raw.len() % 3 != 0 || ![16, 24, 32].contains(&n) {
            anyhow::bail!("encoders.master_keys_hex must be 3 × 16, 24 or 32 bytes");
        }
        MasterKeys::new(&raw[..n], &raw[n..2 * n], &raw[2 * n..])
            .map_err(|e| anyhow::anyhow!("encoders.master_keys_hex: {e}"))
    }

    /// The transport key (from the config, or the embedded-mode file shared with `[pki]`).
    pub fn transport_key(&self, data_dir: &Path) -> anyhow::Result<TransportKey> {
        let pki = cardpipe_pki::settings::PkiConfig {
            transport_key_id: self.transport_key_id.clone(),
            transport_key_hex: self.transport_key_hex.clone(),
            ..Default::default()
        };
        pki.transport_key(data_dir)
    }

    /// The transport PINs.
    pub fn pins(&self) -> TransportPins {
        let z = |s: &SecretString| Zeroizing::new(s.expose_secret().as_bytes().to_vec());
        TransportPins {
            id_pin: z(&self.transport_id_pin),
            sign_pin: z(&self.transport_sign_pin),
            puk: z(&self.transport_puk),
        }
    }

    /// Script options.
    pub fn script(&self) -> ScriptOptions {
        if self.extended_length {
            ScriptOptions::extended()
        } else {
            ScriptOptions::default()
        }
    }

    /// Farm settings.
    pub fn farm_settings(&self) -> FarmSettings {
        FarmSettings {
            max_consecutive_failures: self.max_consecutive_failures.max(1),
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
        }
    }

    /// The blank stock of in-process encoders: fault rates and the slow-EEPROM latency
    /// (encode time spread over the APDUs of a typical card).
    pub fn blank_stock(&self, master: &MasterKeys) -> Arc<BlankStock> {
        let latency = if self.encode_time_ms == 0 {
            Duration::ZERO
        } else {
            let apdus = crate::bench::apdus_per_card(
                &script::sample_image(20_000, 0),
                master,
                &self.script(),
            )
            .map(|(a, _)| a.max(1))
            .unwrap_or(60);
            Duration::from_millis(self.encode_time_ms) / apdus as u32
        };
        let (dead, tear, wfr) = (self.dead_rate, self.tear_rate, self.write_failure_rate);
        let seed: u64 = rand::random();
        Arc::new(BlankStock::new(master.clone(), rand::random(), move |n| {
            let u = |salt: u64| unit(seed ^ salt, n);
            Faults {
                dead: u(1) < dead,
                write_failure_rate: wfr,
                seed: seed ^ u64::from(n),
                tear_at_write: (u(2) < tear).then_some(3 + (u(3) * 8.0) as u32),
                apdu_latency: latency,
                keygen_latency: Duration::ZERO,
                pulled_before_first_command: false,
            }
        }))
    }

    /// Builds the farm this configuration describes.
    pub fn farm(&self) -> anyhow::Result<Arc<Farm>> {
        Ok(match self.kind {
            EncoderKind::InProcess => {
                let stock = self.blank_stock(&self.master_keys()?);
                Farm::new(
                    Box::new(InProcessSource::new(self.count.max(1), stock)),
                    self.farm_settings(),
                )
            }
            EncoderKind::Pcsc => {
                // pcsc-lite is loaded at run time: a machine without it refuses here, with
                // what to install, rather than logging failed reader scans forever.
                crate::pcsc::library()
                    .map_err(|e| anyhow::anyhow!("[encoders] kind = \"pcsc\": {e}"))?;
                Farm::new(
                    Box::new(PcscSource {
                        insert_timeout: Duration::from_millis(self.insert_timeout_ms),
                        skip_readers: self.skip_readers.clone(),
                    }),
                    self.farm_settings(),
                )
            }
        })
    }
}

/// A deterministic value in [0, 1) for blank `n`.
fn unit(seed: u64, n: u32) -> f64 {
    let mut x = seed ^ (u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The transport PINs written to every card. `Debug` is redacted.
#[derive(Clone)]
pub struct TransportPins {
    /// ID PIN.
    pub id_pin: Zeroizing<Vec<u8>>,
    /// Signature PIN.
    pub sign_pin: Zeroizing<Vec<u8>>,
    /// PUK.
    pub puk: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for TransportPins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportPins(redacted)")
    }
}

/// The secrets of an encoder site. `Debug` shows the transport key id only.
pub struct SiteSecrets {
    /// SCP03 master keys.
    pub master: Arc<MasterKeys>,
    /// The transport key that unwraps the citizen keys.
    pub transport: TransportKey,
    /// Transport PINs.
    pub pins: TransportPins,
}

impl std::fmt::Debug for SiteSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteSecrets")
            .field("transport_key_id", &self.transport.key_id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_test_secrets_are_named_never_shown() {
        let defaults = EncodersConfig::default();
        assert_eq!(
            defaults.test_secrets_in_use(),
            [
                "encoders.master_keys_hex",
                "encoders.transport_id_pin",
                "encoders.transport_sign_pin",
                "encoders.transport_puk"
            ]
        );
        // The simulator's keys spelt out are as public as the empty default.
        let spelt = EncodersConfig {
            master_keys_hex: SecretString::from(
                hex::encode((0x40u8..0x50).collect::<Vec<_>>()).repeat(3),
            ),
            ..EncodersConfig::default()
        };
        assert!(
            spelt
                .test_secrets_in_use()
                .contains(&"encoders.master_keys_hex")
        );
        let own = EncodersConfig {
            master_keys_hex: SecretString::from("a1".repeat(48)),
            transport_id_pin: SecretString::from("271828"),
            transport_sign_pin: SecretString::from("314159"),
            transport_puk: SecretString::from("16180339"),
            ..EncodersConfig::default()
        };
        assert!(own.test_secrets_in_use().is_empty());
    }
}
