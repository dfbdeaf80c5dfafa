//! The one error type of the coordinator's state machine.
//!
//! Every variant names the ids involved and says what to do next. An error from
//! [`State::apply`](crate::State::apply) always means the state was left exactly as it was.

use crate::command::Role;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a command was refused (or a snapshot could not be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    // --- who is asking ---
    #[error("unknown token {id}: authenticate with a token an admin created")]
    UnknownToken { id: String },
    #[error("token {id} is revoked: ask an admin for a new token")]
    TokenRevoked { id: String },
    #[error("token {id} has expired: ask an admin for a new token")]
    TokenExpired { id: String },
    #[error(
        "token {id} has been used up (a coordinator join token admits one coordinator, a node join token as many nodes as it was made for): ask for a new token"
    )]
    TokenUsedUp { id: String },
    #[error(
        "the actor {name} ({role}) does not match token {id}: authenticate again with that token"
    )]
    ActorMismatch {
        id: String,
        name: String,
        role: Role,
    },
    #[error("role {role} may not {action}: it needs the {needed} role or higher")]
    Forbidden {
        action: &'static str,
        role: Role,
        needed: Role,
    },

    // --- input ---
    #[error("invalid {what} {value:?}: {hint}")]
    Invalid {
        what: &'static str,
        value: String,
        hint: String,
    },

    // --- members ---
    #[error("unknown node {id}: the node must join first")]
    UnknownNode { id: String },
    #[error("node {id} is already {state}: nothing to change")]
    NodeAlreadyInState { id: String, state: &'static str },
    #[error(
        "node {id} was heard from {silent_ms} ms ago, within the {grace_ms} ms grace period: \
         wait until it is overdue before marking it down"
    )]
    NodeNotOverdue {
        id: String,
        silent_ms: u64,
        grace_ms: u64,
    },
    #[error("coordinator {id} is already a member: remove it first to change its address")]
    CoordinatorExists { id: u64 },
    #[error("unknown coordinator {id}: list the coordinators and use one of their ids")]
    UnknownCoordinator { id: u64 },
    #[error("coordinator {id} is the last one: add another before removing it")]
    LastCoordinator { id: u64 },
    #[error(
        "coordinator id {id} belonged to a removed coordinator and is never given again: use a new id"
    )]
    CoordinatorRetired { id: u64 },

    // --- shelf ---
    #[error("unknown model {model}: register a version of it first")]
    UnknownModel { model: String },
    #[error("publisher key {key} is not trusted: an admin trusts it with `sophon key trust`")]
    UntrustedKey { key: String },
    #[error("unknown publisher key {key}")]
    UnknownKey { key: String },
    #[error("unknown version {version} of model {model}: register it first")]
    UnknownVersion { model: String, version: String },
    #[error(
        "version {version} of model {model} already exists: versions are immutable, register a new version"
    )]
    VersionExists { model: String, version: String },
    #[error(
        "bundle digest {digest} is already on the shelf as {model}@{version}: a bundle is registered once"
    )]
    DuplicateDigest {
        digest: String,
        model: String,
        version: String,
    },
    #[error("{model}@{version} is off the shelf: put it on the shelf first")]
    OffShelf { model: String, version: String },
    #[error("{model}@{version} is deprecated: use a newer version")]
    Deprecated { model: String, version: String },
    #[error("{model}@{version} is already {what}: nothing to change")]
    VersionAlreadyInState {
        model: String,
        version: String,
        what: &'static str,
    },
    #[error("model {model} has no tag {tag}: tag a version with it first")]
    UnknownTag { model: String, tag: String },

    // --- approvals ---
    #[error("no policy for environment {environment}: an admin must set one first")]
    UnknownEnvironment { environment: String },
    #[error("environment {environment} needs no approval: deploy directly")]
    NoApprovalNeeded { environment: String },
    #[error(
        "{model}@{version} already has open request {request} for {environment}: decide or withdraw it"
    )]
    AlreadyPending {
        model: String,
        version: String,
        environment: String,
        request: u64,
    },
    #[error("{model}@{version} is already approved for {environment}: deploy it")]
    AlreadyApproved {
        model: String,
        version: String,
        environment: String,
    },
    #[error("unknown approval request {id}: list the open requests and use one of their ids")]
    UnknownRequest { id: u64 },
    #[error("approval request {id} is already {status}: open a new request instead")]
    RequestClosed { id: u64, status: &'static str },
    #[error(
        "{name} submitted or published what request {id} is about and may not decide it: ask another approver"
    )]
    SelfApproval { id: u64, name: String },
    #[error(
        "role {role} may not decide request {id}: environment {environment} needs the {needed} role or higher"
    )]
    WrongRole {
        id: u64,
        environment: String,
        role: Role,
        needed: Role,
    },
    #[error("{name} has already decided request {id}: each approver decides once")]
    AlreadyDecided { id: u64, name: String },
    #[error("only {submitter}, who submitted request {id}, or an admin may withdraw it")]
    NotSubmitter { id: u64, submitter: String },

    // --- deployments ---
    #[error(
        "{model}@{version} is not approved for {environment}: request approval and wait for it"
    )]
    NotApproved {
        model: String,
        version: String,
        environment: String,
    },
    #[error(
        "deployment {id} is rolling out revision {revision}: wait for it, or `sophon deploy rollback {id}` to abandon it"
    )]
    UpdateInProgress { id: u64, revision: u32 },
    #[error(
        "{model}@{version} is already deployed to {environment} as deployment {id}: scale it instead"
    )]
    DeploymentExists {
        id: u64,
        model: String,
        version: String,
        environment: String,
    },
    #[error("unknown deployment {id}: list the deployments and use one of their ids")]
    UnknownDeployment { id: u64 },

    // --- tokens ---
    #[error("token {id} already exists: choose another id")]
    TokenExists { id: String },
    #[error("another token already has this secret: generate a fresh secret")]
    DuplicateSecret,

    // --- snapshots ---
    #[error(
        "cannot read the state snapshot: {reason}; install a snapshot from a healthy coordinator"
    )]
    Snapshot { reason: String },

    // --- raft ---
    #[error(
        "replica {id} is not the leader, leader is {leader} (0: none known yet): send the \
         proposal to the leader or retry once one is elected"
    )]
    NotLeader { id: u64, leader: u64 },
    #[error("raft on replica {id} refused the request: {reason}; retry, or check the cluster")]
    Raft { id: u64, reason: String },
    #[error(
        "the raft log store at {path} could not be opened: {reason}; check the directory's \
         permissions and free space, or restore it from a peer"
    )]
    LogStore { path: String, reason: String },
    #[error(
        "log entry {index} is not a valid entry: {reason}; the log was written by an \
         incompatible version"
    )]
    LogEntry { index: u64, reason: String },

    // --- the server around the state (IO) ---
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
    #[error("the bundle was refused: {reason}")]
    BadBundle { reason: String },
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("unauthenticated: {reason}")]
    Unauthenticated { reason: String },
    /// An error another coordinator answered with (a forwarded write), kept as it was.
    #[error("{message}")]
    Remote {
        status: u16,
        code: String,
        message: String,
    },
}

/// What sort of failure an [`Error`] is, for the edges that map it to a protocol status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The token is unknown, revoked or does not match (HTTP 401).
    Unauthenticated,
    /// The actor may not do this (HTTP 403).
    Forbidden,
    /// The input is malformed (HTTP 400).
    Invalid,
    /// Something named does not exist (HTTP 404).
    NotFound,
    /// The request clashes with the current state (HTTP 409).
    Conflict,
    /// The body is over a size limit (HTTP 413).
    TooLarge,
    /// No leader or the replica cannot serve now; retry (HTTP 503).
    Unavailable,
    /// A fault of this coordinator (HTTP 500).
    Internal,
}

impl Error {
    /// A stable, machine-readable code: the variant's name in snake case.
    pub fn code(&self) -> &'static str {
        match self {
            Error::UnknownToken { .. } => "unknown_token",
            Error::TokenRevoked { .. } => "token_revoked",
            Error::TokenExpired { .. } => "token_expired",
            Error::TokenUsedUp { .. } => "token_used_up",
            Error::ActorMismatch { .. } => "actor_mismatch",
            Error::Forbidden { .. } => "forbidden",
            Error::Invalid { .. } => "invalid",
            Error::UnknownNode { .. } => "unknown_node",
            Error::NodeAlreadyInState { .. } => "node_already_in_state",
            Error::NodeNotOverdue { .. } => "node_not_overdue",
            Error::CoordinatorExists { .. } => "coordinator_exists",
            Error::UnknownCoordinator { .. } => "unknown_coordinator",
            Error::LastCoordinator { .. } => "last_coordinator",
            Error::CoordinatorRetired { .. } => "coordinator_retired",
            Error::UnknownModel { .. } => "unknown_model",
            Error::UntrustedKey { .. } => "untrusted_key",
            Error::UnknownKey { .. } => "unknown_key",
            Error::UnknownVersion { .. } => "unknown_version",
            Error::VersionExists { .. } => "version_exists",
            Error::DuplicateDigest { .. } => "duplicate_digest",
            Error::OffShelf { .. } => "off_shelf",
            Error::Deprecated { .. } => "deprecated",
            Error::VersionAlreadyInState { .. } => "version_already_in_state",
            Error::UnknownTag { .. } => "unknown_tag",
            Error::UnknownEnvironment { .. } => "unknown_environment",
            Error::NoApprovalNeeded { .. } => "no_approval_needed",
            Error::AlreadyPending { .. } => "already_pending",
            Error::AlreadyApproved { .. } => "already_approved",
            Error::UnknownRequest { .. } => "unknown_request",
            Error::RequestClosed { .. } => "request_closed",
            Error::SelfApproval { .. } => "self_approval",
            Error::WrongRole { .. } => "wrong_role",
            Error::AlreadyDecided { .. } => "already_decided",
            Error::NotSubmitter { .. } => "not_submitter",
            Error::NotApproved { .. } => "not_approved",
            Error::DeploymentExists { .. } => "deployment_exists",
            Error::UpdateInProgress { .. } => "update_in_progress",
            Error::UnknownDeployment { .. } => "unknown_deployment",
            Error::TokenExists { .. } => "token_exists",
            Error::DuplicateSecret => "duplicate_secret",
            Error::Snapshot { .. } => "snapshot",
            Error::NotLeader { .. } => "not_leader",
            Error::Raft { .. } => "raft",
            Error::LogStore { .. } => "log_store",
            Error::LogEntry { .. } => "log_entry",
            Error::Unavailable { .. } => "unavailable",
            Error::Io { .. } => "io",
            Error::BadBundle { .. } => "bad_bundle",
            Error::TooLarge { .. } => "too_large",
            Error::Unauthenticated { .. } => "unauthenticated",
            Error::Remote { .. } => "remote",
        }
    }

    /// What sort of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::TokenRevoked { .. }
            | Error::TokenExpired { .. }
            | Error::TokenUsedUp { .. }
            | Error::ActorMismatch { .. } => ErrorKind::Unauthenticated,
            Error::Forbidden { .. }
            | Error::SelfApproval { .. }
            | Error::WrongRole { .. }
            | Error::NotSubmitter { .. } => ErrorKind::Forbidden,
            Error::Invalid { .. } => ErrorKind::Invalid,
            Error::UnknownToken { .. } => ErrorKind::NotFound,
            Error::UnknownNode { .. }
            | Error::UnknownCoordinator { .. }
            | Error::UnknownModel { .. }
            | Error::UnknownKey { .. }
            | Error::UnknownVersion { .. }
            | Error::UnknownTag { .. }
            | Error::UnknownEnvironment { .. }
            | Error::UnknownRequest { .. }
            | Error::UnknownDeployment { .. } => ErrorKind::NotFound,
            Error::NodeAlreadyInState { .. }
            | Error::NodeNotOverdue { .. }
            | Error::CoordinatorExists { .. }
            | Error::LastCoordinator { .. }
            | Error::CoordinatorRetired { .. }
            | Error::UntrustedKey { .. }
            | Error::VersionExists { .. }
            | Error::DuplicateDigest { .. }
            | Error::OffShelf { .. }
            | Error::Deprecated { .. }
            | Error::VersionAlreadyInState { .. }
            | Error::NoApprovalNeeded { .. }
            | Error::AlreadyPending { .. }
            | Error::AlreadyApproved { .. }
            | Error::RequestClosed { .. }
            | Error::AlreadyDecided { .. }
            | Error::NotApproved { .. }
            | Error::DeploymentExists { .. }
            | Error::UpdateInProgress { .. }
            | Error::TokenExists { .. }
            | Error::DuplicateSecret => ErrorKind::Conflict,
            Error::Snapshot { .. }
            | Error::Raft { .. }
            | Error::LogStore { .. }
            | Error::LogEntry { .. }
            | Error::Io { .. } => ErrorKind::Internal,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::BadBundle { .. } => ErrorKind::Invalid,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::Unauthenticated { .. } => ErrorKind::Unauthenticated,
            Error::Remote { status, .. } => match status {
                401 => ErrorKind::Unauthenticated,
                403 => ErrorKind::Forbidden,
                400 => ErrorKind::Invalid,
                404 => ErrorKind::NotFound,
                409 => ErrorKind::Conflict,
                413 => ErrorKind::TooLarge,
                503 => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            },
            Error::NotLeader { .. } => ErrorKind::Unavailable,
        }
    }
}

/// Shorthand for [`Error::Invalid`].
pub(crate) fn invalid(
    what: &'static str,
    value: impl Into<String>,
    hint: impl Into<String>,
) -> Error {
    Error::Invalid {
        what,
        value: value.into(),
        hint: hint.into(),
    }
}
