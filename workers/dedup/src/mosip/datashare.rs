//! Biometrics by `referenceURL`: MOSIP's data share, behind MOSIP's AuthN.
//!
//! The URL is read with `GET`, the JWT from MOSIP's AuthN API (`clientidsecretkey`, client
//! id, secret key and app id from `[abis.datashare]`) sent as the `Authorization` cookie, as
//! the ABIS API specification asks. The token is fetched on first use and again when the
//! data share answers `KER-ATH-401` (expired). MOSIP answers functional failures with HTTP
//! 200 and a JSON `errors` list: `DAT-SER-006 Data share usage expired` becomes failure 17,
//! the others failure 7.
//!
//! The body must be the CBEFF XML itself (the data share policy's encryption set to none,
//! over TLS). A partner-encrypted body (`#KEY_SPLITTER#`, RSA-OAEP + AES-GCM under the
//! ABIS partner's key) is refused with failure 7 and a log line saying so: decrypting it
//! would need the partner's private key in this process, which cardpipe keeps only in
//! the HSM (not built).

use std::time::Duration;

use base64::Engine;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::config::DatashareConfig;
use super::message::{FailureReason, response_time};

/// Why biometrics could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Failed(String),
    #[error("the data share URL has expired")]
    Expired,
}

impl FetchError {
    pub fn reason(&self) -> FailureReason {
        match self {
            FetchError::Failed(_) => FailureReason::UnableToFetchBiometrics,
            FetchError::Expired => FailureReason::DataShareExpired,
        }
    }
}

/// The data share client.
#[derive(Debug)]
pub struct DatashareClient {
    http: reqwest::Client,
    config: DatashareConfig,
    token: tokio::sync::Mutex<Option<String>>,
}

enum Read {
    Body(String),
    AuthFailed,
}

impl DatashareClient {
    pub fn new(config: DatashareConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_seconds))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        Ok(DatashareClient {
            http,
            config,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The CBEFF document behind `url`.
    pub async fn fetch(&self, url: &str) -> Result<String, FetchError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|_| FetchError::Failed("referenceURL is not a URL".into()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(FetchError::Failed(format!(
                "referenceURL scheme {:?} is not http(s)",
                parsed.scheme()
            )));
        }
        for attempt in 0..2 {
            let token = if self.config.auth_url.is_empty() {
                None
            } else {
                Some(self.token(attempt > 0).await?)
            };
            match self.read(&parsed, token.as_deref()).await? {
                Read::Body(body) => return Ok(body),
                Read::AuthFailed if attempt == 0 && token.is_some() => continue,
                Read::AuthFailed => {
                    return Err(FetchError::Failed(
                        "the data share refused the ABIS's token (KER-ATH-401/403)".into(),
                    ));
                }
            }
        }
        unreachable!("the loop returns")
    }

    async fn read(&self, url: &reqwest::Url, token: Option<&str>) -> Result<Read, FetchError> {
        let mut request = self.http.get(url.clone());
        if let Some(t) = token {
            request = request.header(reqwest::header::COOKIE, format!("Authorization={t}"));
        }
        let mut response = request
            .send()
            .await
            .map_err(|e| FetchError::Failed(format!("data share unreachable ({})", kind(&e))))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Ok(Read::AuthFailed);
        }
        if !status.is_success() {
            return Err(FetchError::Failed(format!(
                "data share answered HTTP {status}"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Failed(format!("data share read failed ({})", kind(&e))))?
        {
            if body.len() + chunk.len() > self.config.max_bytes {
                return Err(FetchError::Failed(format!(
                    "the data share body exceeds [abis.datashare] max_bytes = {}",
                    self.config.max_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
        let trimmed = text.trim_start_matches('\u{feff}').trim();
        if trimmed.starts_with('<') {
            return Ok(Read::Body(trimmed.to_owned()));
        }
        if trimmed.starts_with('{') {
            return match mosip_error(trimmed) {
                Some(code) if code == "KER-ATH-401" || code == "KER-ATH-403" => {
                    Ok(Read::AuthFailed)
                }
                Some(code)
                    if code == "DAT-SER-006"
                        && trimmed.to_ascii_lowercase().contains("expired") =>
                {
                    Err(FetchError::Expired)
                }
                Some(code) => Err(FetchError::Failed(format!(
                    "the data share answered {code}"
                ))),
                None => Err(FetchError::Failed(
                    "the data share answered JSON, not a CBEFF document".into(),
                )),
            };
        }
        // Base64 (MOSIP encodes data share bodies): plain CBEFF inside, or the encrypted form.
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(trimmed.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(trimmed))
            .map_err(|_| {
                FetchError::Failed("the data share body is neither XML nor base64".into())
            })?;
        if decoded
            .windows(b"#KEY_SPLITTER#".len())
            .any(|w| w == b"#KEY_SPLITTER#")
        {
            return Err(FetchError::Failed(
                "the data share body is partner-encrypted (#KEY_SPLITTER#): not supported; set \
                 the ABIS data share policy's encryption to none (TLS protects the transfer)"
                    .into(),
            ));
        }
        let inner = String::from_utf8(decoded)
            .map_err(|_| FetchError::Failed("the decoded data share body is not text".into()))?;
        if inner.trim_start().starts_with('<') {
            Ok(Read::Body(inner.trim().to_owned()))
        } else {
            Err(FetchError::Failed(
                "the decoded data share body is not a CBEFF document".into(),
            ))
        }
    }

    /// The AuthN token, fetched when there is none or `renew`.
    async fn token(&self, renew: bool) -> Result<String, FetchError> {
        let mut held = self.token.lock().await;
        if let (false, Some(t)) = (renew, held.as_ref()) {
            return Ok(t.clone());
        }
        let body = json!({
            "id": "mosip.io.clientId.pwd",
            "version": "1.0",
            "metadata": {},
            "requesttime": response_time(OffsetDateTime::now_utc()),
            "request": {
                "appId": self.config.app_id,
                "clientId": self.config.client_id,
                "secretKey": self.config.secret_key.expose_secret(),
            },
        });
        let response = self
            .http
            .post(&self.config.auth_url)
            .json(&body)
            .send()
            .await
            .map_err(|e| FetchError::Failed(format!("MOSIP AuthN unreachable ({})", kind(&e))))?;
        let status = response.status();
        let cookie = response
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| {
                let first = v.split(';').next()?.trim();
                let (name, value) = first.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_owned())
            })
            .filter(|t| !t.is_empty());
        match cookie {
            Some(token) if status.is_success() => {
                *held = Some(token.clone());
                Ok(token)
            }
            _ => Err(FetchError::Failed(format!(
                "MOSIP AuthN gave no token (HTTP {status}); check [abis.datashare] client_id, \
                 secret_key and app_id"
            ))),
        }
    }
}

/// The first `errors[].errorCode` of a MOSIP JSON answer.
fn mosip_error(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v.get("errors")?
        .as_array()?
        .first()?
        .get("errorCode")?
        .as_str()
        .map(str::to_owned)
}

/// What went wrong with a request, without the URL (it may carry a share token).
fn kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection refused or no route"
    } else if e.is_body() || e.is_decode() {
        "bad body"
    } else {
        "request failed"
    }
}
