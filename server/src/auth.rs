//! Optional API keys with roles. Keys are compared in constant time and never logged.

use std::path::Path;

use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    /// Generate images, read server info.
    Generate,
    /// Submit feedback.
    Feedback,
    /// Export data, manage adapters.
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "generate" => Some(Self::Generate),
            "feedback" => Some(Self::Feedback),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// The role's name as keys files spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Feedback => "feedback",
            Self::Admin => "admin",
        }
    }
}

struct ApiKey {
    secret: Vec<u8>,
    roles: Vec<Role>,
}

/// The configured keys (empty = authentication off).
#[derive(Default)]
pub(crate) struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable `authorization: Bearer <key>` header, or an unknown key.
    #[error("missing or invalid API key: send `authorization: Bearer <key>`")]
    Unauthenticated,
    /// A valid key without the role the call needs.
    #[error("this API key lacks the `{0}` role")]
    Forbidden(&'static str),
}

impl ApiKeys {
    /// Parses `ROLES KEY` entries separated by newlines or `;` (`#` starts a comment).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (n, entry) in text.split(['\n', ';']).enumerate() {
            let entry = entry.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let (roles, key) = entry
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("entry {}: expected `ROLES KEY`", n + 1))?;
            let roles = roles
                .split(',')
                .map(|r| {
                    Role::parse(r).ok_or_else(|| {
                        format!(
                            "entry {}: unknown role `{r}` (generate, feedback, admin)",
                            n + 1
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let key = key.trim();
            if key.len() < 16 {
                return Err(format!(
                    "entry {}: keys must be at least 16 characters",
                    n + 1
                ));
            }
            keys.push(ApiKey {
                secret: key.as_bytes().to_vec(),
                roles,
            });
        }
        Ok(Self { keys })
    }

    /// Reads a keys file.
    pub(crate) fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Merges another set of keys into this one.
    pub(crate) fn extend(&mut self, other: ApiKeys) {
        self.keys.extend(other.keys);
    }

    /// Whether authentication is on.
    pub(crate) fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Number of keys.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Checks an `authorization` header value for `role`. Every key is compared, in constant
    /// time, so timing reveals neither which key matched nor how much of it.
    pub(crate) fn check(&self, authorization: Option<&str>, role: Role) -> Result<(), AuthError> {
        if !self.enabled() {
            return Ok(());
        }
        let presented = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(AuthError::Unauthenticated)?;
        let mut matched: Option<&ApiKey> = None;
        for key in &self.keys {
            if bool::from(key.secret.as_slice().ct_eq(presented.as_bytes())) {
                matched = Some(key);
            }
        }
        let key = matched.ok_or(AuthError::Unauthenticated)?;
        if key.roles.contains(&role) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(role.name()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_check_roles() {
        let keys = ApiKeys::parse("generate,feedback app-key-0123456789\n# ops\nadmin admin-key-0123456789; feedback fb-key-0123456789ab").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(
            keys.check(Some("Bearer app-key-0123456789"), Role::Generate),
            Ok(())
        );
        assert_eq!(
            keys.check(Some("Bearer app-key-0123456789"), Role::Admin),
            Err(AuthError::Forbidden("admin"))
        );
        assert_eq!(
            keys.check(Some("Bearer admin-key-0123456789"), Role::Admin),
            Ok(())
        );
        assert_eq!(
            keys.check(Some("Bearer wrong-key-0123456789"), Role::Generate),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            keys.check(Some("app-key-0123456789"), Role::Generate),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            keys.check(None, Role::Generate),
            Err(AuthError::Unauthenticated)
        );
        assert!(
            ApiKeys::parse("superuser k-0123456789abcdef")
                .unwrap_err()
                .contains("unknown role")
        );
        assert!(ApiKeys::parse("admin short").unwrap_err().contains("16"));
        assert_eq!(ApiKeys::default().check(None, Role::Admin), Ok(()));
    }
}
