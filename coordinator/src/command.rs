//! What goes into the replicated log: an [`Entry`] is one [`Command`], who issued it ([`Actor`])
//! and the leader's clock when it was proposed.
//!
//! Every replica applies the same entries in the same order with
//! [`State::apply`](crate::State::apply), so nothing here may depend on the applying machine:
//! time comes from [`Entry::now_ms`], identities from [`Actor`].
//!
//! Roles are ordered, `viewer < publisher < approver < operator < admin`; a command needs the
//! role [`Command::required_role`] names or a higher one. A few commands add a rule of their
//! own (the approver role an environment's policy names, submitter-only withdrawal, holders
//! revoking their own token); those are checked where the command is applied. The `join` role
//! stands outside the hierarchy: it may do one thing, admit a coordinator
//! ([`Command::AddCoordinator`]), and no other role may use a join token's place.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::scheduler::{Device, ReplicaPhase};
use crate::state::canary::{CanarySpec, Figures, Verdict};
use crate::state::members::{Inventory, NodeLoad};
use crate::state::shelf::ManifestSummary;

/// What a token lets its holder do. Ordered: each role may do everything the lower ones may,
/// except [`Role::Join`], which is outside the order ([`Role::allows`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Admits one coordinator through the mesh's `JOIN` and nothing else: no admin API route,
    /// no other command. Join tokens always expire and are single-use (see
    /// [`Command::CreateLimitedToken`]). First in the order, so that a plain comparison ranks
    /// it below every other role; [`Role::allows`] keeps it out of the hierarchy altogether.
    Join,
    /// Admits mesh nodes through the mesh's `NODE_JOIN` and nothing else. Node join tokens
    /// always expire and have a use count; an operator mints them (`sophon node join-token`).
    #[serde(rename = "node-join")]
    NodeJoin,
    /// Reads only.
    Viewer,
    /// Registers model versions, curates the shelf, asks for approval.
    Publisher,
    /// Decides approval requests (where the environment's policy names this role).
    Approver,
    /// Runs the fleet: nodes, deployments.
    Operator,
    /// Everything, including policies, tokens and coordinators.
    Admin,
}

impl Role {
    /// The roles of the hierarchy, lowest first ([`Role::Join`] stands outside it).
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Publisher,
        Role::Approver,
        Role::Operator,
        Role::Admin,
    ];

    /// Whether this role may do what `needed` may. `join` allows only `join`, and only `join`
    /// allows `join`: an admin token is no join token, and a join token reads nothing.
    pub fn allows(self, needed: Role) -> bool {
        match (self, needed) {
            (Role::Join | Role::NodeJoin, _) | (_, Role::Join | Role::NodeJoin) => self == needed,
            _ => self >= needed,
        }
    }

    /// The lowercase name used in messages and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Join => "join",
            Role::NodeJoin => "node-join",
            Role::Viewer => "viewer",
            Role::Publisher => "publisher",
            Role::Approver => "approver",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who issued a command.
///
/// A person or program acting through the admin API carries the id of the token it presented
/// ([`State::authenticate`](crate::State::authenticate) builds this), and `apply` checks again
/// that the token exists, is not revoked and still names this actor and role, so a token revoked
/// while the entry was in flight is refused on every replica.
///
/// An actor without a token is a trusted internal principal: the leader itself (marking a silent
/// node down), a node agent authenticated by its mTLS certificate (join, heartbeat), or the
/// bootstrap that creates the first admin token. The edges must never build one from user input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The principal's name; approvals count distinct names, and the submitter is found by name.
    pub name: String,
    /// The role the command runs with.
    pub role: Role,
    /// The token presented, if any.
    pub token_id: Option<String>,
}

impl Actor {
    /// A trusted internal principal (no token); see the type's page.
    pub fn system(name: impl Into<String>, role: Role) -> Actor {
        Actor {
            name: name.into(),
            role,
            token_id: None,
        }
    }
}

/// One committed log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub actor: Actor,
    /// The leader's wall clock when it proposed the entry, in ms since the Unix epoch. The state
    /// never lets its own clock go backwards (a new leader's clock may be behind the old one's).
    pub now_ms: u64,
    pub command: Command,
    /// The client write this entry carries, the same on every attempt to commit it: an entry
    /// whose write id was already applied changes nothing and answers the first outcome
    /// ([`State::apply`](crate::State::apply)). `None` (entries logged before write ids
    /// existed, the bootstrap) is never deduplicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_id: Option<WriteId>,
}

/// Names one client write across every attempt to commit it (a retry after a lost proposal,
/// a forward to a new leader), so that the state machine applies it at most once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WriteId {
    /// The coordinator that took the write from its client.
    pub origin: u64,
    /// That coordinator process's incarnation (random at each start), since `seq` restarts.
    pub incarnation: u64,
    /// The write's number within the incarnation, from 1.
    pub seq: u64,
}

/// Which replica of which deployment: `replica` counts from 0 to the deployment's replicas − 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaKey {
    pub deployment: u64,
    /// The deployment's revision the replica runs.
    #[serde(default = "crate::scheduler::first_revision")]
    pub revision: u32,
    pub replica: u32,
}

/// What a node says about itself when it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: String,
    /// Where other members reach it (`host:port`).
    pub address: String,
    pub inventory: Inventory,
    pub labels: BTreeMap<String, String>,
    pub zone: String,
    /// Where clients reach its V2 HTTP endpoint (`host:port`; empty: not recorded).
    #[serde(default)]
    pub http_address: String,
    /// The environments it serves; empty: every environment.
    #[serde(default)]
    pub environments: Vec<String>,
    /// The sophon version it runs.
    #[serde(default)]
    pub version: String,
    /// The serial (lowercase hex) of the certificate issued to it: the mesh accepts `node/<id>`
    /// only with this certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
}

/// A replica's state as its node reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaUpdate {
    pub deployment: u64,
    #[serde(default = "crate::scheduler::first_revision")]
    pub revision: u32,
    pub replica: u32,
    pub phase: ReplicaPhase,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A change to the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    // --- members ---
    /// A node joins, or joins again with a new address or inventory (a restart). A node that
    /// was draining stays draining.
    JoinNode {
        node: NodeSpec,
    },
    /// A node is alive; `ready` lists the replicas placed on it that it serves now.
    Heartbeat {
        node: String,
        load: NodeLoad,
        ready: Vec<ReplicaKey>,
    },
    /// A node's replicas changed state, or a node marked down is heard from again. The leader
    /// proposes it only on such a transition: liveness itself is the leader's soft state.
    ReportReplicas {
        node: String,
        replicas: Vec<ReplicaUpdate>,
    },
    /// Stop placing replicas on a node and move its replicas elsewhere.
    DrainNode {
        node: String,
    },
    /// Undo a drain.
    ResumeNode {
        node: String,
    },
    /// A node leaves the cluster for good; its replicas move elsewhere.
    LeaveNode {
        node: String,
    },
    /// The leader saw no heartbeat within the grace period; the node's replicas move elsewhere
    /// until it heartbeats again.
    MarkNodeDown {
        node: String,
    },
    /// How long a node may stay silent before it may be marked down.
    SetHeartbeatGrace {
        grace_ms: u64,
    },
    /// How much host memory the scheduler may promise each node, in percent (100: none).
    SetMemoryOvercommit {
        percent: u32,
    },
    /// Record a coordinator (the Raft membership change itself is the driver's business). An
    /// admin may issue it, or a join token's holder (which uses the token up).
    AddCoordinator {
        id: u64,
        /// Where the other coordinators reach it over the mesh (QUIC), `host:port`.
        address: String,
        /// Where its admin API listens, `host:port` (empty: not recorded).
        #[serde(default)]
        api_address: String,
        /// The serial number (lowercase hex) of the certificate issued to it: the mesh accepts
        /// `coordinator/<id>` only with this certificate (`None`: any the CA signed, as
        /// recorded before serials were).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cert_serial: Option<String>,
    },
    RemoveCoordinator {
        id: u64,
    },

    // --- shelf ---
    /// A new version of a model (the model is created with its first version), as a draft that
    /// is on the shelf.
    RegisterModelVersion {
        model: String,
        version: String,
        /// The bundle digest, 64 lowercase hex digits.
        digest: String,
        manifest: ManifestSummary,
        /// The ed25519 key that signed the bundle, 64 lowercase hex digits.
        publisher_key: String,
    },
    /// Make a version available again (new versions start on the shelf).
    PutOnShelf {
        model: String,
        version: String,
    },
    /// Withdraw a version from use: it can be neither deployed nor submitted for approval.
    /// Running deployments are left alone.
    TakeOffShelf {
        model: String,
        version: String,
    },
    /// Mark a version deprecated: no new deployments or approval requests.
    Deprecate {
        model: String,
        version: String,
    },
    /// Point a tag (like `stable`) at a version; a tag names one version per model, so it
    /// moves from any other version.
    Tag {
        model: String,
        version: String,
        tag: String,
    },
    Untag {
        model: String,
        tag: String,
    },
    /// Trust bundles signed by this ed25519 key (64 lowercase hex digits); `name` says whose.
    TrustKey {
        key: String,
        name: String,
    },
    /// Stop trusting a key: versions it signed stay, new ones are refused.
    DistrustKey {
        key: String,
    },

    // --- approvals ---
    /// How many approvals an environment needs, and from which role. 0 means the environment
    /// needs none.
    SetPolicy {
        environment: String,
        required_approvals: u32,
        approver_role: Role,
    },
    RequestApproval {
        model: String,
        version: String,
        environment: String,
    },
    Decide {
        request: u64,
        approve: bool,
        comment: String,
    },
    /// The submitter takes back an open request; the version returns to draft there.
    Withdraw {
        request: u64,
    },

    // --- deployments ---
    /// Run `replicas` replicas of a version in an environment; `hardware` is the wish, best
    /// device first (the manifest's preference when `None`).
    CreateDeployment {
        model: String,
        version: String,
        environment: String,
        replicas: u32,
        hardware: Option<Vec<Device>>,
        /// Nodes load its replicas at once and evict them last (otherwise on first request).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hot: bool,
        /// Autoscale it from the start (`replicas` is then kept within the bounds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        autoscale: Option<crate::state::autoscale::Autoscale>,
    },
    /// Mark a deployment hot (its nodes load it at once and evict it last) or cold (loaded on
    /// its first request, evicted first).
    SetDeploymentHot {
        deployment: u64,
        hot: bool,
    },
    ScaleDeployment {
        deployment: u64,
        replicas: u32,
    },
    DeleteDeployment {
        deployment: u64,
    },
    /// A rolling update to another version: new replicas first (at most `max_surge` beyond
    /// the replica count; default a quarter, at least one), each ready before an old one goes.
    /// The version must be deployable in the environment, approvals included.
    UpdateDeployment {
        deployment: u64,
        version: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_surge: Option<u32>,
    },
    /// Abandon a running update, or roll out an earlier revision's version again (`to`;
    /// default: the revision that served before the current one).
    RollbackDeployment {
        deployment: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<u32>,
    },
    /// Start a canary of `version`: a rolling update that holds at each step's share of the
    /// traffic until the leader's analysis (or an operator) moves it on or rolls it back.
    CanaryDeployment {
        deployment: u64,
        version: String,
        spec: CanarySpec,
    },
    /// A decision on a canary's step, with the figures it was made on (the leader's analysis
    /// commits these).
    JudgeCanary {
        deployment: u64,
        revision: u32,
        step: u32,
        verdict: Verdict,
        canary: Figures,
        stable: Figures,
        reason: String,
    },
    /// Promote a canary now, skipping its remaining steps.
    PromoteCanary {
        deployment: u64,
    },
    /// Autoscale a deployment within bounds (`None`: stop; its replica count stays).
    SetAutoscale {
        deployment: u64,
        autoscale: Option<crate::state::autoscale::Autoscale>,
    },
    /// The autoscaler resizes a deployment, or a request activates one at zero (the leader
    /// commits these, with the figures in `reason`).
    Autoscale {
        deployment: u64,
        replicas: u32,
        reason: String,
    },
    /// A command the approval rules refused (a version not approved for the environment),
    /// recorded in the audit log by the coordinator that refused it, as its actor.
    RecordRefusal {
        /// The refused command's action, like `update-deployment`.
        action: String,
        target: String,
        reason: String,
    },
    /// What a model version keeps in memory once loaded, as a node measured it (the leader
    /// commits it when a node reports more than recorded): the scheduler counts it instead of
    /// the manifest's estimate.
    RecordModelMemory {
        model: String,
        version: String,
        node: String,
        memory_mb: u64,
    },

    // --- tokens ---
    /// Store a token; the secret itself never enters the log, only its SHA-256
    /// ([`hash_secret`](crate::hash_secret)).
    CreateToken {
        id: String,
        name: String,
        role: Role,
        secret_hash: String,
    },
    /// Revoke a token: admins any token, holders their own.
    RevokeToken {
        id: String,
    },
    /// Store a token that expires `expires_in_ms` after the entry's time and/or may be used
    /// for `uses` commands (each command applied with it uses one); `None`: no such limit.
    /// A [`Role::Join`] token must have both, and exactly one use.
    CreateLimitedToken {
        id: String,
        name: String,
        role: Role,
        secret_hash: String,
        #[serde(default)]
        expires_in_ms: Option<u64>,
        #[serde(default)]
        uses: Option<u32>,
    },
}

impl Command {
    /// The lowest role that may issue this command (further rules: see the module page).
    pub fn required_role(&self) -> Role {
        use Command::*;
        match self {
            // Recorded on behalf of whoever was refused (already authorized for the command).
            RevokeToken { .. } | RecordRefusal { .. } => Role::Viewer,
            RegisterModelVersion { .. }
            | PutOnShelf { .. }
            | TakeOffShelf { .. }
            | Deprecate { .. }
            | Tag { .. }
            | Untag { .. }
            | RequestApproval { .. }
            | Withdraw { .. } => Role::Publisher,
            Decide { .. } => Role::Approver,
            JoinNode { .. }
            | Heartbeat { .. }
            | ReportReplicas { .. }
            | RecordModelMemory { .. }
            | SetDeploymentHot { .. }
            | DrainNode { .. }
            | ResumeNode { .. }
            | LeaveNode { .. }
            | MarkNodeDown { .. }
            | CreateDeployment { .. }
            | ScaleDeployment { .. }
            | DeleteDeployment { .. }
            | UpdateDeployment { .. }
            | RollbackDeployment { .. }
            | CanaryDeployment { .. }
            | JudgeCanary { .. }
            | PromoteCanary { .. }
            | SetAutoscale { .. }
            | Autoscale { .. } => Role::Operator,
            // An operator mints node join tokens; every other token is an admin's business.
            CreateLimitedToken {
                role: Role::NodeJoin,
                ..
            } => Role::Operator,
            SetHeartbeatGrace { .. }
            | SetMemoryOvercommit { .. }
            | AddCoordinator { .. }
            | RemoveCoordinator { .. }
            | SetPolicy { .. }
            | TrustKey { .. }
            | DistrustKey { .. }
            | CreateToken { .. }
            | CreateLimitedToken { .. } => Role::Admin,
        }
    }

    /// The command's name in the audit log.
    pub fn action(&self) -> &'static str {
        use Command::*;
        match self {
            JoinNode { .. } => "join-node",
            Heartbeat { .. } => "heartbeat",
            ReportReplicas { .. } => "report-replicas",
            DrainNode { .. } => "drain-node",
            ResumeNode { .. } => "resume-node",
            LeaveNode { .. } => "leave-node",
            MarkNodeDown { .. } => "mark-node-down",
            SetHeartbeatGrace { .. } => "set-heartbeat-grace",
            SetMemoryOvercommit { .. } => "set-memory-overcommit",
            AddCoordinator { .. } => "add-coordinator",
            RemoveCoordinator { .. } => "remove-coordinator",
            RegisterModelVersion { .. } => "register-model-version",
            PutOnShelf { .. } => "put-on-shelf",
            TakeOffShelf { .. } => "take-off-shelf",
            Deprecate { .. } => "deprecate",
            Tag { .. } => "tag",
            Untag { .. } => "untag",
            TrustKey { .. } => "trust-key",
            DistrustKey { .. } => "distrust-key",
            SetPolicy { .. } => "set-policy",
            RequestApproval { .. } => "request-approval",
            Decide { .. } => "decide",
            Withdraw { .. } => "withdraw",
            CreateDeployment { .. } => "create-deployment",
            ScaleDeployment { .. } => "scale-deployment",
            DeleteDeployment { .. } => "delete-deployment",
            UpdateDeployment { .. } => "update-deployment",
            RollbackDeployment { .. } => "rollback-deployment",
            CanaryDeployment { .. } => "canary-deployment",
            JudgeCanary { .. } => "judge-canary",
            PromoteCanary { .. } => "promote-canary",
            SetAutoscale { .. } => "set-autoscale",
            Autoscale { .. } => "autoscale",
            SetDeploymentHot { .. } => "set-hot",
            RecordRefusal { .. } => "refused",
            RecordModelMemory { .. } => "record-model-memory",
            CreateToken { .. } | CreateLimitedToken { .. } => "create-token",
            RevokeToken { .. } => "revoke-token",
        }
    }
}

/// What a successful apply did, for the caller that proposed the entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The audit record written (`None` only for a heartbeat that changed nothing but the node's
    /// liveness and load; see [`State::apply`](crate::State::apply)).
    pub audit_seq: Option<u64>,
    /// An id the command created.
    pub created: Option<Created>,
    /// Whether placements changed (the driver then pushes assignments to the nodes).
    pub placements_changed: bool,
}

/// An id a command created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Created {
    ApprovalRequest(u64),
    Deployment(u64),
}
