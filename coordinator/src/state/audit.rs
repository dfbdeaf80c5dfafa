//! The audit log: one record per accepted change, append-only, numbered from 0.

use serde::{Deserialize, Serialize};

use super::{Ctx, State};
use crate::command::Role;

/// Who changed what, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 0.
    pub seq: u64,
    /// The entry's time (after the never-backwards clamp).
    pub at_ms: u64,
    pub actor: String,
    pub role: Role,
    pub token_id: Option<String>,
    /// The command, like `decide` or `create-deployment`.
    pub action: String,
    /// What it changed, like `node n1`, `model fraud@1.2` or `request 7`.
    pub target: String,
    /// What happened, in words, including any placements that moved.
    pub detail: String,
}

impl State {
    /// Appends a record; returns its sequence number.
    pub(crate) fn record(
        &mut self,
        ctx: Ctx<'_>,
        action: &str,
        target: String,
        detail: String,
    ) -> u64 {
        let seq = self.audit.len() as u64;
        self.audit.push(AuditRecord {
            seq,
            at_ms: ctx.now,
            actor: ctx.actor.name.clone(),
            role: ctx.actor.role,
            token_id: ctx.actor.token_id.clone(),
            action: action.to_string(),
            target,
            detail,
        });
        seq
    }
}
