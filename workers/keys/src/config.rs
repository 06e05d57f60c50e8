//! `[keys]` in pipeline.toml: where citizen key pairs are generated.

use cardpipe_pki::custody::KeyOrigin;
use serde::Deserialize;

/// The section name.
pub const SECTION: &str = "keys";

/// `[keys]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// `"on_card"` (default): the chip generates both key pairs during personalization and
    /// the CA certifies the public keys it answers — no private key of a citizen ever exists
    /// outside the chip. `"off_card"`: the keys stage generates them in software and they
    /// travel wrapped under the encoder site's transport key (for chips that cannot generate
    /// keys).
    pub generation: KeyOrigin,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            generation: KeyOrigin::OnCard,
        }
    }
}

/// Loads `[keys]`.
pub fn load(loaded: &cardpipe_common::config::LoadedConfig) -> anyhow::Result<KeysConfig> {
    loaded
        .section(SECTION)
        .map_err(|e| anyhow::anyhow!("{}", cardpipe_common::config::describe(&e)))
}
