//! Approvals: a [`Policy`] per environment, and [`ApprovalRequest`]s for a (version,
//! environment) pair.
//!
//! # Rules
//! - An environment exists once an admin sets its policy. A policy of 0 approvals means the
//!   environment needs none (like `staging`): requests there are refused, deployments go ahead.
//! - Only an open request can be decided, only by an actor whose role is at least the policy's
//!   approver role, never by the request's submitter nor by whoever registered the version, and
//!   once per approver.
//! - The request is approved when the distinct approvers whose role still satisfies the policy
//!   reach the policy's count; one rejection by an eligible approver rejects it (a rejection must
//!   say why). The policy in force at each decision applies, so raising the bar holds up requests
//!   already open; lowering it takes effect at their next decision.
//! - The submitter (or an admin) may withdraw an open request; the version is a draft there again.
//! - Every decision, comment included, is in the audit log.

use serde::{Deserialize, Serialize};

use super::shelf::Stage;
use super::validate::{self, MAX_COMMENT_LEN};
use super::{Change, Ctx, State};
use crate::command::{Created, Role};
use crate::error::{Error, Result, invalid};

/// The most approvals a policy may ask for.
pub const MAX_REQUIRED_APPROVALS: u32 = 10;

/// How an environment guards its deployments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub environment: String,
    /// Distinct approvals needed; 0: no approval needed.
    pub required_approvals: u32,
    /// The lowest role whose approvals count.
    pub approver_role: Role,
    pub set_by: String,
    pub set_at_ms: u64,
}

/// Where a request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Open,
    Approved,
    Rejected,
    Withdrawn,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Open => "open",
            RequestStatus::Approved => "approved",
            RequestStatus::Rejected => "rejected",
            RequestStatus::Withdrawn => "withdrawn",
        }
    }
}

/// One approver's decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub approver: String,
    /// The approver's role when deciding.
    pub role: Role,
    pub approve: bool,
    pub comment: String,
    pub at_ms: u64,
}

/// A request to approve a version for an environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub id: u64,
    pub model: String,
    pub version: String,
    pub environment: String,
    pub submitter: String,
    pub created_at_ms: u64,
    pub status: RequestStatus,
    pub decisions: Vec<Decision>,
    /// The policy applied at the latest decision (at submission before any).
    pub required_approvals: u32,
    pub approver_role: Role,
    pub closed_at_ms: Option<u64>,
}

impl ApprovalRequest {
    /// Distinct approvers whose approval counts under the request's recorded policy.
    pub fn counted_approvals(&self) -> usize {
        let mut names: Vec<&str> = self
            .decisions
            .iter()
            .filter(|d| {
                d.approve && d.role.allows(self.approver_role) && d.approver != self.submitter
            })
            .map(|d| d.approver.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }
}

impl State {
    pub(crate) fn set_policy(
        &mut self,
        ctx: Ctx<'_>,
        environment: &str,
        required_approvals: u32,
        approver_role: Role,
    ) -> Result<Change> {
        validate::id("environment", environment)?;
        if required_approvals > MAX_REQUIRED_APPROVALS {
            return Err(invalid(
                "required approvals",
                required_approvals.to_string(),
                format!("ask for at most {MAX_REQUIRED_APPROVALS}"),
            ));
        }
        if !approver_role.allows(Role::Approver) {
            return Err(invalid(
                "approver role",
                approver_role.as_str(),
                "choose approver, operator or admin",
            ));
        }
        self.policies.insert(
            environment.to_string(),
            Policy {
                environment: environment.to_string(),
                required_approvals,
                approver_role,
                set_by: ctx.actor.name.clone(),
                set_at_ms: ctx.now,
            },
        );
        Ok(Change::new(
            format!("environment {environment}"),
            format!("policy: {required_approvals} approvals from {approver_role} or higher"),
        ))
    }

    pub(crate) fn policy(&self, environment: &str) -> Result<&Policy> {
        self.policies
            .get(environment)
            .ok_or_else(|| Error::UnknownEnvironment {
                environment: environment.to_string(),
            })
    }

    pub(crate) fn request_approval(
        &mut self,
        ctx: Ctx<'_>,
        model: &str,
        version: &str,
        environment: &str,
    ) -> Result<Change> {
        let policy = self.policy(environment)?;
        if policy.required_approvals == 0 {
            return Err(Error::NoApprovalNeeded {
                environment: environment.to_string(),
            });
        }
        let (required_approvals, approver_role) = (policy.required_approvals, policy.approver_role);
        let v = self.offerable_version(model, version)?;
        let named = || (model.to_string(), version.to_string());
        match v.stage(environment) {
            Some(Stage::Pending { request }) => {
                let (model, version) = named();
                return Err(Error::AlreadyPending {
                    model,
                    version,
                    environment: environment.to_string(),
                    request,
                });
            }
            Some(Stage::Approved { .. }) => {
                let (model, version) = named();
                return Err(Error::AlreadyApproved {
                    model,
                    version,
                    environment: environment.to_string(),
                });
            }
            Some(Stage::Rejected { .. }) | None => {}
        }
        let id = self.next_request;
        self.next_request += 1;
        self.requests.insert(
            id,
            ApprovalRequest {
                id,
                model: model.to_string(),
                version: version.to_string(),
                environment: environment.to_string(),
                submitter: ctx.actor.name.clone(),
                created_at_ms: ctx.now,
                status: RequestStatus::Open,
                decisions: Vec::new(),
                required_approvals,
                approver_role,
                closed_at_ms: None,
            },
        );
        self.version_mut(model, version)?
            .stages
            .insert(environment.to_string(), Stage::Pending { request: id });
        let mut change = Change::new(
            format!("request {id}"),
            format!(
                "{model}@{version} submitted for {environment}: needs {required_approvals} \
                 approvals from {approver_role} or higher"
            ),
        );
        change.created = Some(Created::ApprovalRequest(id));
        Ok(change)
    }

    pub(crate) fn decide(
        &mut self,
        ctx: Ctx<'_>,
        id: u64,
        approve: bool,
        comment: &str,
    ) -> Result<Change> {
        let request = self.requests.get(&id).ok_or(Error::UnknownRequest { id })?;
        if request.status != RequestStatus::Open {
            return Err(Error::RequestClosed {
                id,
                status: request.status.as_str(),
            });
        }
        let policy = self.policy(&request.environment)?;
        let actor = ctx.actor;
        if !actor.role.allows(policy.approver_role) {
            return Err(Error::WrongRole {
                id,
                environment: request.environment.clone(),
                role: actor.role,
                needed: policy.approver_role,
            });
        }
        let version = self.version(&request.model, &request.version)?;
        if actor.name == request.submitter || actor.name == version.created_by {
            return Err(Error::SelfApproval {
                id,
                name: actor.name.clone(),
            });
        }
        if request.decisions.iter().any(|d| d.approver == actor.name) {
            return Err(Error::AlreadyDecided {
                id,
                name: actor.name.clone(),
            });
        }
        validate::text("comment", comment, MAX_COMMENT_LEN, !approve)?;
        let (required, role) = (policy.required_approvals, policy.approver_role);

        // Validated; now change.
        let Some(request) = self.requests.get_mut(&id) else {
            return Err(Error::UnknownRequest { id });
        };
        request.decisions.push(Decision {
            approver: actor.name.clone(),
            role: actor.role,
            approve,
            comment: comment.to_string(),
            at_ms: ctx.now,
        });
        request.required_approvals = required;
        request.approver_role = role;
        let counted = request.counted_approvals();
        let needed = required.max(1) as usize;
        let outcome = if !approve {
            Some(RequestStatus::Rejected)
        } else if counted >= needed {
            Some(RequestStatus::Approved)
        } else {
            None
        };
        let (model, version, environment) = (
            request.model.clone(),
            request.version.clone(),
            request.environment.clone(),
        );
        let mut detail = format!(
            "{} {model}@{version} for {environment} ({counted} of {needed} approvals)",
            if approve { "approved" } else { "rejected" },
        );
        if let Some(status) = outcome {
            request.status = status;
            request.closed_at_ms = Some(ctx.now);
            let stage = if status == RequestStatus::Approved {
                Stage::Approved { request: id }
            } else {
                Stage::Rejected { request: id }
            };
            self.version_mut(&model, &version)?
                .stages
                .insert(environment, stage);
            detail.push_str(&format!("; request {}", status.as_str()));
        }
        if !comment.is_empty() {
            detail.push_str(&format!("; comment: {comment}"));
        }
        Ok(Change::new(format!("request {id}"), detail))
    }

    pub(crate) fn withdraw(&mut self, ctx: Ctx<'_>, id: u64) -> Result<Change> {
        let request = self.requests.get(&id).ok_or(Error::UnknownRequest { id })?;
        if request.status != RequestStatus::Open {
            return Err(Error::RequestClosed {
                id,
                status: request.status.as_str(),
            });
        }
        if ctx.actor.name != request.submitter && !ctx.actor.role.allows(Role::Admin) {
            return Err(Error::NotSubmitter {
                id,
                submitter: request.submitter.clone(),
            });
        }
        let (model, version, environment) = (
            request.model.clone(),
            request.version.clone(),
            request.environment.clone(),
        );
        self.version(&model, &version)?;
        // Validated; now change.
        if let Some(request) = self.requests.get_mut(&id) {
            request.status = RequestStatus::Withdrawn;
            request.closed_at_ms = Some(ctx.now);
        }
        self.version_mut(&model, &version)?
            .stages
            .remove(&environment);
        Ok(Change::new(
            format!("request {id}"),
            format!("withdrawn; {model}@{version} is a draft for {environment} again"),
        ))
    }
}
