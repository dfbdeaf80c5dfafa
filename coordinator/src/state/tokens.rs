//! Bearer tokens and their roles.
//!
//! Only the SHA-256 of a secret ([`hash_secret`]) enters the log and the state; the secret is
//! shown once to whoever created it. A revoked token stays listed (for the audit trail) but
//! authenticates nothing, and entries already in flight with it are refused when applied.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::validate::{self, MAX_TEXT_LEN};
use super::{Change, Ctx, State};
use crate::command::{Actor, Role};
use crate::error::{Error, Result};

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
}

/// The SHA-256 of a token secret as 64 lowercase hex digits: what
/// [`CreateToken`](crate::Command::CreateToken) carries.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl State {
    /// The actor a bearer secret stands for, or `None` for an unknown or revoked secret.
    pub fn authenticate(&self, secret: &str) -> Option<Actor> {
        let hash = hash_secret(secret);
        self.tokens
            .values()
            .find(|t| t.secret_hash == hash && t.revoked_at_ms.is_none())
            .map(|t| Actor {
                name: t.name.clone(),
                role: t.role,
                token_id: Some(t.id.clone()),
            })
    }

    pub(crate) fn create_token(
        &mut self,
        ctx: Ctx<'_>,
        id: &str,
        name: &str,
        role: Role,
        secret_hash: &str,
    ) -> Result<Change> {
        validate::id("token id", id)?;
        validate::text("token holder name", name, MAX_TEXT_LEN, true)?;
        validate::hex64("secret hash", secret_hash)?;
        if self.tokens.contains_key(id) {
            return Err(Error::TokenExists { id: id.to_string() });
        }
        if self.tokens.values().any(|t| t.secret_hash == secret_hash) {
            return Err(Error::DuplicateSecret);
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
            },
        );
        Ok(Change::new(
            format!("token {id}"),
            format!("created for {name} with role {role}"),
        ))
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
