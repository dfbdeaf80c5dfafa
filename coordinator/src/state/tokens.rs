//! Bearer tokens and their roles.
//!
//! Only the SHA-256 of a secret ([`hash_secret`]) enters the log and the state; the secret is
//! shown once to whoever created it. A revoked token stays listed (for the audit trail) but
//! authenticates nothing, and entries already in flight with it are refused when applied.
//!
//! A token may be limited ([`CreateLimitedToken`](crate::Command::CreateLimitedToken)): it
//! expires at `expires_at_ms` and/or may be used for `uses_left` more commands. Both are checked
//! when an entry applies, against the entry's clock, and a use is taken by the entry that
//! applies with it, so two entries racing with a single-use token cannot both succeed. Join
//! tokens ([`Role::Join`]) are always limited: one use, an expiry.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::validate::{self, MAX_TEXT_LEN};
use super::{Change, Ctx, State};
use crate::command::{Actor, Role};
use crate::error::{Error, Result, invalid};

/// A stored token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    /// The holder; approvals and audit records name this.
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret, 64 lowercase hex digits.
    pub secret_hash: String,
    pub created_by: String,
    pub created_at_ms: u64,
    pub revoked_at_ms: Option<u64>,
    /// Refused from this time on (the state's clock, ms since the Unix epoch); `None`: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// How many more commands it may issue; `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u32>,
}

/// The longest a join token may live: 7 days.
pub const MAX_JOIN_TOKEN_MS: u64 = 7 * 24 * 3600 * 1000;

impl Token {
    /// Why the token cannot be used at `now_ms`, if it cannot: revoked, expired or used up.
    pub fn unusable(&self, now_ms: u64) -> Option<Error> {
        let id = self.id.clone();
        if self.revoked_at_ms.is_some() {
            Some(Error::TokenRevoked { id })
        } else if self.expires_at_ms.is_some_and(|at| now_ms >= at) {
            Some(Error::TokenExpired { id })
        } else if self.uses_left == Some(0) {
            Some(Error::TokenUsedUp { id })
        } else {
            None
        }
    }

    /// The actor that presents this token.
    pub fn actor(&self) -> Actor {
        Actor {
            name: self.name.clone(),
            role: self.role,
            token_id: Some(self.id.clone()),
        }
    }
}

/// The SHA-256 of a token secret as 64 lowercase hex digits: what
/// [`CreateToken`](crate::Command::CreateToken) carries.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl State {
    /// The actor a bearer secret stands for, or `None` for an unknown, revoked, expired (by
    /// the state's clock) or used-up secret.
    pub fn authenticate(&self, secret: &str) -> Option<Actor> {
        self.token_for_secret(secret)
            .filter(|t| t.unusable(self.clock_ms).is_none())
            .map(Token::actor)
    }

    /// The token whose secret this is, whatever its state.
    pub fn token_for_secret(&self, secret: &str) -> Option<&Token> {
        let hash = hash_secret(secret);
        self.tokens.values().find(|t| t.secret_hash == hash)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_token(
        &mut self,
        ctx: Ctx<'_>,
        id: &str,
        name: &str,
        role: Role,
        secret_hash: &str,
        expires_in_ms: Option<u64>,
        uses: Option<u32>,
    ) -> Result<Change> {
        validate::id("token id", id)?;
        validate::text("token holder name", name, MAX_TEXT_LEN, true)?;
        validate::hex64("secret hash", secret_hash)?;
        if expires_in_ms == Some(0) {
            return Err(invalid(
                "token expiry",
                "0",
                "give it a lifetime above 0 ms",
            ));
        }
        if uses == Some(0) {
            return Err(invalid("token uses", "0", "allow at least one use"));
        }
        if role == Role::Join {
            match (expires_in_ms, uses) {
                (Some(ms), Some(1)) if ms <= MAX_JOIN_TOKEN_MS => {}
                (Some(ms), Some(1)) => {
                    return Err(invalid(
                        "join token expiry",
                        format!("{ms} ms"),
                        format!("a join token lives at most {MAX_JOIN_TOKEN_MS} ms (7 days)"),
                    ));
                }
                _ => {
                    return Err(invalid(
                        "join token",
                        "(no expiry or not single-use)",
                        "a join token expires and admits one coordinator: make it with \
                         `sophon coordinator join-token`",
                    ));
                }
            }
        }
        if role == Role::NodeJoin {
            match expires_in_ms {
                Some(ms) if ms <= MAX_JOIN_TOKEN_MS && uses.is_some() => {}
                _ => {
                    return Err(invalid(
                        "node join token",
                        "(no expiry, over 7 days, or no use count)",
                        "a node join token expires within 7 days and admits a counted number \
                         of nodes: make it with `sophon node join-token`",
                    ));
                }
            }
        }
        if self.tokens.contains_key(id) {
            return Err(Error::TokenExists { id: id.to_string() });
        }
        if self.tokens.values().any(|t| t.secret_hash == secret_hash) {
            return Err(Error::DuplicateSecret);
        }
        let expires_at_ms = expires_in_ms.map(|ms| ctx.now.saturating_add(ms));
        let mut detail = format!("created for {name} with role {role}");
        if let Some(at) = expires_at_ms {
            detail.push_str(&format!(", expires at {at} ms"));
        }
        if let Some(n) = uses {
            detail.push_str(&format!(", {n} use(s)"));
        }
        self.tokens.insert(
            id.to_string(),
            Token {
                id: id.to_string(),
                name: name.to_string(),
                role,
                secret_hash: secret_hash.to_string(),
                created_by: ctx.actor.name.clone(),
                created_at_ms: ctx.now,
                revoked_at_ms: None,
                expires_at_ms,
                uses_left: uses,
            },
        );
        Ok(Change::new(format!("token {id}"), detail))
    }

    /// Takes one use of the actor's token if it is limited (after its command applied);
    /// returns the token's id and the uses left.
    pub(crate) fn use_token(&mut self, actor: &Actor) -> Option<(String, u32)> {
        let id = actor.token_id.as_ref()?;
        let token = self.tokens.get_mut(id)?;
        let left = token.uses_left.as_mut()?;
        *left = left.saturating_sub(1);
        Some((id.clone(), *left))
    }

    pub(crate) fn revoke_token(&mut self, ctx: Ctx<'_>, id: &str) -> Result<Change> {
        let own = ctx.actor.token_id.as_deref() == Some(id);
        if !own && !ctx.actor.role.allows(Role::Admin) {
            return Err(Error::Forbidden {
                action: "revoke-token",
                role: ctx.actor.role,
                needed: Role::Admin,
            });
        }
        let token = self
            .tokens
            .get_mut(id)
            .ok_or_else(|| Error::UnknownToken { id: id.to_string() })?;
        if token.revoked_at_ms.is_some() {
            return Err(Error::TokenRevoked { id: id.to_string() });
        }
        token.revoked_at_ms = Some(ctx.now);
        Ok(Change::new(
            format!("token {id}"),
            format!("revoked ({} held it)", token.name),
        ))
    }
}
