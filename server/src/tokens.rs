//! Feedback tokens: `EXPIRY.MAC` where MAC = HMAC-SHA256(secret, image_id || EXPIRY), hex. They
//! let whoever received an image (a browser, say) rate it without an API key, and nobody else.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    /// Not of the form `EXPIRY.MAC`.
    #[error("the feedback token is malformed")]
    Malformed,
    /// Past its expiry.
    #[error("the feedback token has expired")]
    Expired,
    /// Not signed by this server for this image.
    #[error("the feedback token does not match the image")]
    Mismatch,
}

/// Signs and checks feedback tokens.
#[derive(Clone)]
pub(crate) struct TokenSigner {
    secret: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("secret", &"<redacted>")
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl TokenSigner {
    /// A signer with `secret` whose tokens live `ttl`.
    pub(crate) fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            secret: secret.to_vec(),
            ttl,
        }
    }

    fn mac(&self, image_id: &str, expiry: u64) -> HmacSha256 {
        // Any key length is valid for HMAC, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key"));
        mac.update(image_id.as_bytes());
        mac.update(b"|");
        mac.update(expiry.to_string().as_bytes());
        mac
    }

    /// A token for `image_id`, valid from `now` for the signer's ttl.
    pub(crate) fn sign(&self, image_id: &str, now: SystemTime) -> String {
        let expiry = now
            .checked_add(self.ttl)
            .unwrap_or(now)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let tag = self.mac(image_id, expiry).finalize().into_bytes();
        format!("{expiry}.{}", hex::encode(tag))
    }

    /// Checks `token` for `image_id` at `now` (the MAC is compared in constant time).
    pub(crate) fn verify(
        &self,
        image_id: &str,
        token: &str,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let (expiry, tag) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let expiry: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
        self.mac(image_id, expiry)
            .verify_slice(&tag)
            .map_err(|_| TokenError::Mismatch)?;
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if now > expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// 256 random bits.
pub(crate) fn random_secret() -> Vec<u8> {
    (0..4)
        .flat_map(|_| rand::random::<u64>().to_le_bytes())
        .collect()
}

/// The secret kept at `path` (hex), generated and written (mode 0600, atomically) on first
/// use. An unreadable one is moved aside and replaced: tokens signed with it stop working, but
/// the server starts.
pub(crate) fn kept_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read_to_string(path) {
        Ok(text) => match hex::decode(text.trim()) {
            Ok(secret) if secret.len() >= 16 => return Ok(secret),
            _ => {
                let aside = path.with_extension("damaged");
                std::fs::rename(path, &aside)?;
                tracing::error!(path = %path.display(), aside = %aside.display(), "the kept feedback secret is unreadable: moved aside, generating a new one (earlier tokens are void)");
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret = random_secret();
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(hex::encode(&secret).as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    tracing::info!(path = %path.display(), "generated the feedback secret; tokens survive restarts");
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated once, then read back; owner-only; a damaged file is replaced, not fatal.
    #[test]
    fn the_kept_secret_survives_restarts_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feedback-secret");
        let first = kept_secret(&path).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(kept_secret(&path).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not hex").unwrap();
        let replaced = kept_secret(&path).unwrap();
        assert_ne!(replaced, first);
        assert!(dir.path().join("feedback-secret.damaged").exists());
    }

    #[test]
    fn tokens_verify_only_for_their_image_secret_and_lifetime() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let signer = TokenSigner::new(b"secret", Duration::from_secs(60));
        let token = signer.sign("img-1", t0);
        assert!(token.starts_with("1000060."), "{token}");
        assert_eq!(signer.verify("img-1", &token, t0), Ok(()));
        assert_eq!(
            signer.verify("img-2", &token, t0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            TokenSigner::new(b"other", Duration::from_secs(60)).verify("img-1", &token, t0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            signer.verify("img-1", &token, t0 + Duration::from_secs(61)),
            Err(TokenError::Expired)
        );
        // A forged expiry breaks the MAC.
        let forged = token.replacen("1000060", "9999999", 1);
        assert_eq!(
            signer.verify("img-1", &forged, t0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            signer.verify("img-1", "nonsense", t0),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            signer.verify("img-1", "12.zz", t0),
            Err(TokenError::Malformed)
        );
    }
}
