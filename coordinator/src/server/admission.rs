//! Admitting a coordinator: join tokens, the `JOIN` request and who signs its certificate.
//!
//! # The flow
//! 1. An admin mints a **join token** ([`Core::create_join_token`]: role `join`, one use, an
//!    expiry, default 1 h) and hands the joiner the join string
//!    `sophon-join:<CA fingerprint>:<secret>@<mesh address>`.
//! 2. The joiner ([`join`]) makes its own key, connects with no certificate, pinning the CA by
//!    the fingerprint and accepting only a coordinator's certificate, and sends a CSR with the
//!    secret (`JOIN`).
//! 3. A follower forwards the `JOIN` to the leader. The leader checks that the secret is a
//!    usable **join** token (any other role, admin included, is refused), has the CSR signed
//!    for `coordinator/<next id>` — by itself if it holds the CA key, else by a coordinator
//!    that does (`SIGN`, which a key holder serves for the current leader only) — and commits
//!    [`AddCoordinator`](crate::Command::AddCoordinator) with the certificate's serial **as the
//!    join token's holder**: applying it takes the token's one use, so of two joins racing with
//!    one token exactly one commits; the other's certificate is dropped unsent (and the mesh
//!    would refuse it: its serial is not the recorded one). Then the new id becomes a learner.
//! 4. The answer carries the certificate, the CA certificate and the members' addresses, never
//!    the CA key. The joiner checks the certificate (its key, its principal, signed by the
//!    pinned CA) before it keeps it.
//!
//! # Where the CA key lives
//! Only in `ca/ca.key` of the data directory `coordinator init` made (and of any coordinator
//! an operator copied it to on purpose, see `docs/DECISIONS.md`). A coordinator without it
//! serves everything else; when it leads, joins are signed by a key holder over the mesh.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sophon_mesh::{Identity, Principal};

use super::transport::{self, MeshCaller, kind};
use super::{Core, io, join_string, mesh, new_token, parse_join_string, write_member_file};
use crate::raft::RedbLogStore;
use crate::{Actor, Command, Error, Result, Role, State};

/// How long a join token lives unless told otherwise.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// What a joining coordinator sends.
#[derive(Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: String,
    pub csr_pem: String,
    pub mesh_address: String,
    pub api_address: String,
}

/// What it gets back: its certificate and the CA's, never the CA's key.
#[derive(Serialize, Deserialize)]
pub struct JoinAnswer {
    pub id: u64,
    pub cert_pem: String,
    pub ca_pem: String,
    /// The coordinators' mesh addresses, by id.
    pub peers: BTreeMap<u64, String>,
}

/// What the leader asks a key holder to sign.
#[derive(Serialize, Deserialize)]
struct SignRequest {
    csr_pem: String,
    /// The coordinator to sign for (ignored when `node` is set).
    id: u64,
    /// The node to sign for (`node/<id>`), when the joiner is a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SignAnswer {
    cert_pem: String,
}

/// A join token as it is handed out (the secret is shown once).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinToken {
    /// The token's id (to revoke it).
    pub id: String,
    /// The join string for `sophon coordinator join`.
    pub join_token: String,
    /// When it expires (ms since the Unix epoch, the cluster's clock).
    pub expires_at_ms: u64,
}

/// The actor of the join token whose secret this is: refused unless it is a usable **join**
/// token at `now_ms` (an admin token is no join token).
fn join_actor(state: &State, secret: &str, now_ms: u64) -> Result<Actor> {
    token_actor(state, secret, now_ms, Role::Join)
}

/// The actor of the token whose secret this is, refused unless it is a usable token of `role`
/// (`join` or `node-join`) at `now_ms`.
pub(super) fn token_actor(state: &State, secret: &str, now_ms: u64, role: Role) -> Result<Actor> {
    let (unknown, wrong_role) = match role {
        Role::NodeJoin => (
            "the node join token is unknown: make one with `sophon node join-token`",
            "not a node join token (`sophon node join-token`)",
        ),
        _ => (
            "the join token is unknown: make one with `sophon coordinator join-token`",
            "not a join token: a coordinator joins with a join token (`sophon coordinator \
             join-token`)",
        ),
    };
    let token = state
        .token_for_secret(secret)
        .ok_or_else(|| Error::Unauthenticated {
            reason: unknown.into(),
        })?;
    if token.role != role {
        return Err(Error::Unauthenticated {
            reason: format!("this is a token with role {}, {wrong_role}", token.role),
        });
    }
    if let Some(e) = token.unusable(now_ms.max(state.clock_ms())) {
        return Err(e);
    }
    Ok(token.actor())
}

pub(super) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Core {
    /// Whether this coordinator holds the CA key (and can sign certificates).
    pub fn holds_ca_key(&self) -> bool {
        self.ca.is_some()
    }

    /// Mints a join token as `actor` (an admin): one use, expiring after `expires_in`, and the
    /// join string that points at this coordinator's mesh address.
    pub async fn create_join_token(&self, actor: Actor, expires_in: Duration) -> Result<JoinToken> {
        let ms = u64::try_from(expires_in.as_millis()).unwrap_or(u64::MAX);
        let (id, secret) = new_token();
        self.write(
            actor,
            Command::CreateLimitedToken {
                id: id.clone(),
                name: "coordinator-join".into(),
                role: Role::Join,
                secret_hash: crate::hash_secret(&secret),
                expires_in_ms: Some(ms),
                uses: Some(1),
            },
        )
        .await?;
        let token_id = id.clone();
        let expires_at_ms = self
            .driver
            .read(true, move |s| {
                s.tokens().get(&token_id).and_then(|t| t.expires_at_ms)
            })
            .await?
            .unwrap_or_default();
        Ok(JoinToken {
            id,
            join_token: join_string(&self.ca_fingerprint(), &secret, &self.config.mesh_advertise),
            expires_at_ms,
        })
    }

    /// Serves a `JOIN` (see the module page): on a follower, forwards it to the leader; on the
    /// leader, checks the join token, has the certificate signed, commits the new member
    /// (using the token up) and adds it as a learner.
    pub(super) async fn serve_join(
        &self,
        caller: &MeshCaller,
        body: &[u8],
    ) -> Result<serde_json::Value> {
        let principal = match caller {
            MeshCaller::Other(principal) => Some(principal.to_string()),
            MeshCaller::Node { id, .. } => Some(format!("node/{id}")),
            _ => None,
        };
        if let Some(principal) = principal {
            return Err(Error::Unauthenticated {
                reason: format!(
                    "{principal} may not join: a coordinator joins with no certificate"
                ),
            });
        }
        let request: JoinRequest =
            serde_json::from_slice(body).map_err(|e| io("decode a join request", e))?;
        if let Some(leader) = self.leader_elsewhere()? {
            // One hop only: a join forwarded here by a coordinator that took us for the leader
            // goes back as "not the leader" rather than round a stale view.
            if matches!(caller, MeshCaller::Coordinator { .. }) {
                return Err(Error::NotLeader {
                    id: self.id,
                    leader,
                });
            }
            return self
                .peers
                .call::<serde_json::Value>(leader, kind::JOIN, &request)
                .await;
        }
        let secret = request.secret.clone();
        let now = wall_ms();
        let actor = self
            .driver
            .read(true, move |s| join_actor(s, &secret, now))
            .await??;
        let mut attempts = 0;
        let (id, cert_pem) = loop {
            let status = self.driver.status();
            let in_raft = status
                .voters
                .iter()
                .chain(&status.learners)
                .max()
                .copied()
                .unwrap_or(0);
            let id = self
                .driver
                .read(true, |s| s.next_coordinator_id())
                .await?
                .max(in_raft + 1);
            let cert_pem = self.sign_coordinator(&request.csr_pem, id).await?;
            let serial = sophon_mesh::serial_of_pem(&cert_pem).map_err(mesh)?;
            let added = self
                .write(
                    actor.clone(),
                    Command::AddCoordinator {
                        id,
                        address: request.mesh_address.clone(),
                        api_address: request.api_address.clone(),
                        cert_serial: Some(serial),
                    },
                )
                .await;
            match added {
                Ok(_) => break (id, cert_pem),
                // Another join (with another token) took this id first: sign for the next one.
                Err(Error::CoordinatorExists { .. }) if attempts < 3 => attempts += 1,
                Err(Error::Remote { code, .. }) if code == "coordinator_exists" && attempts < 3 => {
                    attempts += 1
                }
                Err(e) => return Err(e),
            }
        };
        self.driver.change_voter(id, true).await?;
        tracing::info!(id, address = %request.mesh_address, "coordinator joined");
        let peers = self
            .driver
            .read(false, |s| {
                s.coordinators()
                    .values()
                    .map(|c| (c.id, c.address.clone()))
                    .collect()
            })
            .await?;
        serde_json::to_value(JoinAnswer {
            id,
            cert_pem,
            ca_pem: self.ca_pem.clone(),
            peers,
        })
        .map_err(|e| io("encode", e))
    }

    /// A certificate for `coordinator/<id>` over the CSR's key: signed here if this coordinator
    /// holds the CA key, else by the first other member that does.
    async fn sign_coordinator(&self, csr_pem: &str, id: u64) -> Result<String> {
        self.sign_for(csr_pem, &Principal::Coordinator(id)).await
    }

    /// Have `csr_pem` signed for `principal` (a coordinator, or a node): by the CA key here, or
    /// by a coordinator that holds it.
    pub(super) async fn sign_for(&self, csr_pem: &str, principal: &Principal) -> Result<String> {
        let principal = principal.clone();
        if let Some(ca) = &self.ca {
            return ca.issue(csr_pem, &principal).map_err(|e| Error::Invalid {
                what: "certificate signing request",
                value: "(the CSR)".into(),
                hint: e.to_string(),
            });
        }
        let status = self.driver.status();
        let request = SignRequest {
            csr_pem: csr_pem.to_string(),
            id: match &principal {
                Principal::Coordinator(id) => *id,
                Principal::Node(_) => 0,
            },
            node: match &principal {
                Principal::Node(id) => Some(id.clone()),
                Principal::Coordinator(_) => None,
            },
        };
        let mut errors = Vec::new();
        for peer in status.voters.iter().chain(&status.learners) {
            if *peer == self.id {
                continue;
            }
            match self
                .peers
                .call::<SignAnswer>(*peer, kind::SIGN, &request)
                .await
            {
                Ok(answer) => {
                    let named = sophon_mesh::principal_of_pem(&answer.cert_pem).map_err(mesh)?;
                    if named != principal {
                        return Err(io(
                            "have a certificate signed",
                            format!("coordinator {peer} signed one for {named}, not {principal}"),
                        ));
                    }
                    return Ok(answer.cert_pem);
                }
                Err(e) => errors.push(format!("coordinator {peer}: {e}")),
            }
        }
        Err(Error::Unavailable {
            reason: format!(
                "this leader (coordinator {}) does not hold the CA key and no coordinator that \
                 does signed the certificate: {}",
                self.id,
                if errors.is_empty() {
                    "there is no other member".to_string()
                } else {
                    errors.join("; ")
                }
            ),
        })
    }

    /// Serves `SIGN` from the leader (`caller`), if this coordinator holds the CA key: signs
    /// a CSR for a coordinator id that no member has or had.
    pub(super) async fn serve_sign(&self, caller: u64, body: &[u8]) -> Result<serde_json::Value> {
        let ca = self.ca.as_ref().ok_or_else(|| Error::Unavailable {
            reason: format!("coordinator {} does not hold the CA key", self.id),
        })?;
        let leader = self.driver.status().leader;
        if caller != leader {
            return Err(Error::Unauthenticated {
                reason: format!(
                    "only the leader may have a certificate signed; coordinator {caller} is not \
                     the leader (coordinator {leader} is)"
                ),
            });
        }
        let request: SignRequest =
            serde_json::from_slice(body).map_err(|e| io("decode a signing request", e))?;
        if let Some(node) = request.node {
            // The leader checked the node's join token before asking.
            crate::state::validate::id("node id", &node)?;
            let cert_pem = ca
                .issue(&request.csr_pem, &Principal::Node(node.clone()))
                .map_err(mesh)?;
            tracing::info!(%node, leader = caller, "signed a joining node's certificate");
            return serde_json::to_value(SignAnswer { cert_pem }).map_err(|e| io("encode", e));
        }
        let id = request.id;
        self.driver
            .read(true, move |s| {
                if s.coordinators().contains_key(&id) {
                    Err(Error::CoordinatorExists { id })
                } else if s
                    .revoked()
                    .contains_key(&Principal::Coordinator(id).to_string())
                {
                    Err(Error::CoordinatorRetired { id })
                } else {
                    Ok(())
                }
            })
            .await??;
        let cert_pem = ca
            .issue(&request.csr_pem, &Principal::Coordinator(id))
            .map_err(mesh)?;
        tracing::info!(
            id,
            leader = caller,
            "signed a joining coordinator's certificate"
        );
        serde_json::to_value(SignAnswer { cert_pem }).map_err(|e| io("encode", e))
    }
}

/// Joins the cluster a join token names, as a new coordinator in `dir`. The data directory
/// gets this coordinator's key and certificate and the CA's certificate, not the CA's key.
pub async fn join(
    dir: &Path,
    join_token: &str,
    mesh_address: &str,
    api_address: &str,
) -> Result<u64> {
    if dir.join("raft.redb").exists() {
        return Err(io(
            format!("join with {}", dir.display()),
            "it already holds a coordinator",
        ));
    }
    let (fingerprint, secret, address) = parse_join_string(join_token)?;
    let (key_pem, csr_pem) = sophon_mesh::new_csr().map_err(mesh)?;
    let cfg = sophon_mesh::EndpointConfig::default();
    let endpoint = sophon_mesh::client_endpoint(&cfg).map_err(mesh)?;
    let client = sophon_mesh::join_client_config(&fingerprint, &cfg).map_err(mesh)?;
    let addr = transport::resolve(&address)?;
    let conn = endpoint
        .connect_with(client, addr, sophon_mesh::SERVER_NAME)
        .map_err(|e| io(format!("connect to {address}"), e))?
        .await
        .map_err(|e| {
            io(
                format!("connect to {address} (is the fingerprint right?)"),
                e,
            )
        })?;
    let request = JoinRequest {
        secret,
        csr_pem,
        mesh_address: mesh_address.into(),
        api_address: api_address.into(),
    };
    let payload = serde_json::to_vec(&request).map_err(|e| io("encode", e))?;
    let (k, bytes) = sophon_mesh::call(&conn, kind::JOIN, &payload, 1 << 20)
        .await
        .map_err(mesh)?;
    let answer: JoinAnswer = transport::decode_answer(k, &bytes)?;
    conn.close(0u32.into(), b"joined");
    // Keep only what checks out: the pinned CA, and a certificate for this key that it signed.
    let answered_ca = sophon_mesh::fingerprint_of_pem(&answer.ca_pem).map_err(mesh)?;
    if !answered_ca.eq_ignore_ascii_case(&fingerprint) {
        return Err(io(
            "join",
            "the answer names another CA than the join token pins",
        ));
    }
    let identity = Identity {
        principal: Principal::Coordinator(answer.id),
        cert_pem: answer.cert_pem,
        key_pem,
        ca_pem: answer.ca_pem,
    };
    identity.check().map_err(mesh)?;
    std::fs::create_dir_all(dir).map_err(|e| io(format!("create {}", dir.display()), e))?;
    identity.save(&dir.join("identity")).map_err(mesh)?;
    RedbLogStore::open(dir.join("raft.redb"))?;
    write_member_file(
        dir,
        &super::MemberFile {
            id: answer.id,
            mesh_address: mesh_address.into(),
            api_address: api_address.into(),
            peers: answer.peers,
            mesh_listen: None,
        },
    )?;
    Ok(answer.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_usable_join_token_admits() {
        use crate::{Command, Entry};
        let mut state = State::new();
        let admin = Actor::system("root", Role::Admin);
        let mut apply = |command: Command, now_ms: u64| {
            state
                .apply(&Entry {
                    actor: admin.clone(),
                    now_ms,
                    command,
                    write_id: None,
                })
                .map(|_| ())
        };
        let limited = |id: &str, secret: &str, role| Command::CreateLimitedToken {
            id: id.into(),
            name: "j".into(),
            role,
            secret_hash: crate::hash_secret(secret),
            expires_in_ms: Some(1000),
            uses: Some(1),
        };
        apply(limited("j1", "s-join", Role::Join), 10).unwrap_or_else(|e| panic!("{e}"));
        apply(
            Command::CreateToken {
                id: "a1".into(),
                name: "a".into(),
                role: Role::Admin,
                secret_hash: crate::hash_secret("s-admin"),
            },
            20,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ok = join_actor(&state, "s-join", 500).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.role, Role::Join);
        let admin_refused = join_actor(&state, "s-admin", 500);
        assert!(
            admin_refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("not a join token")),
            "{admin_refused:?}"
        );
        assert!(matches!(
            join_actor(&state, "s-join", 1010),
            Err(Error::TokenExpired { .. })
        ));
        assert!(join_actor(&state, "nope", 500).is_err());
    }
}
