//! Client tokens: JWTs verified with one configured key and algorithm, and the rights they give.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use shared::ChannelPattern;

use crate::config::Config;

/// The verifier of client tokens. The algorithm is fixed by the key configured, never taken
/// from a token, so `none` and algorithm confusion are refused.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

/// Who a connection is, and what it may do.
#[derive(Debug, Clone)]
pub enum Identity {
    /// Authentication is off.
    Anonymous,
    User(Claims),
}

#[derive(Debug, Clone)]
pub struct Claims {
    pub subject: String,
    /// Unix seconds.
    pub expires: Option<u64>,
    pub channels: Vec<ChannelPattern>,
    pub publish: Vec<ChannelPattern>,
}

#[derive(Deserialize)]
struct TokenClaims {
    sub: String,
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token missing")]
    Missing,
    #[error("token invalid: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Why the key that verifies tokens cannot be used. Names the file, never shows a secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("--jwt-public-key {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--jwt-public-key {path}: not an RSA or P-256 public key in PEM")]
    NotAKey { path: PathBuf },
}

impl Verifier {
    /// The verifier the configuration asks for; `None` when authentication is off.
    pub fn from_config(config: &Config) -> Result<Option<Self>, KeyError> {
        let (key, algorithm) = if let Some(secret) = &config.jwt_secret {
            (
                DecodingKey::from_secret(secret.expose().as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &config.jwt_public_key {
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })?;
            public_key(&pem).ok_or_else(|| KeyError::NotAKey { path: path.clone() })?
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["sub"]);
        // `exp` means what it says: a token expires at its exp, and a connection with it.
        validation.leeway = 0;
        Ok(Some(Self { key, validation }))
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<TokenClaims>(token, &self.key, &self.validation)?;
        let claims = data.claims;
        let patterns = |list: Vec<String>| list.iter().map(|p| ChannelPattern::new(p)).collect();
        Ok(Claims {
            subject: claims.sub,
            expires: claims.exp,
            channels: patterns(claims.channels),
            publish: patterns(claims.publish),
        })
    }
}

fn public_key(pem: &[u8]) -> Option<(DecodingKey, Algorithm)> {
    let text = std::str::from_utf8(pem).ok()?;
    if text.contains("BEGIN RSA PUBLIC KEY") {
        return DecodingKey::from_rsa_pem(pem)
            .ok()
            .map(|k| (k, Algorithm::RS256));
    }
    // A SubjectPublicKeyInfo PEM may hold either kind: the EC parser refuses RSA keys.
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Some((key, Algorithm::ES256));
    }
    DecodingKey::from_rsa_pem(pem)
        .ok()
        .map(|k| (k, Algorithm::RS256))
}

impl Identity {
    /// The subject a session belongs to; anonymous sessions share the empty subject, and are
    /// protected by their unguessable id alone.
    pub fn subject(&self) -> &str {
        match self {
            Identity::Anonymous => "",
            Identity::User(claims) => &claims.subject,
        }
    }

    pub fn may_subscribe(&self, channel: &str) -> bool {
        match self {
            Identity::Anonymous => true,
            Identity::User(claims) => claims.channels.iter().any(|p| p.matches(channel)),
        }
    }

    /// Whether this client may publish to `channel`: with authentication on, where its token's
    /// `publish` claim says, and nothing else; anonymous clients where `anonymous_publish`
    /// (`--client-publish`) lets them.
    pub fn may_publish(&self, channel: &str, anonymous_publish: bool) -> bool {
        match self {
            Identity::Anonymous => anonymous_publish,
            Identity::User(claims) => claims.publish.iter().any(|p| p.matches(channel)),
        }
    }

    /// Time left before the token expires, if it does.
    pub fn expires_in(&self) -> Option<Duration> {
        let Identity::User(Claims {
            expires: Some(exp), ..
        }) = self
        else {
            return None;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Some(Duration::from_secs(*exp).saturating_sub(now))
    }

    pub fn expires(&self) -> Option<u64> {
        match self {
            Identity::Anonymous => None,
            Identity::User(claims) => claims.expires,
        }
    }
}
