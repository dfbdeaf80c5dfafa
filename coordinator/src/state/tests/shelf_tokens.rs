//! The shelf's curation, tokens and roles, snapshots.

use super::*;
use crate::hash_secret;

fn publisher() -> Actor {
    actor("pat", Role::Publisher)
}

#[test]
fn versions_are_registered_once_and_digests_are_unique() {
    let mut w = World::with_shelf();
    let v = w
        .state
        .version("fraud", "1")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(v.on_shelf && !v.deprecated && v.stages.is_empty());
    assert_eq!(v.created_by, "pat");
    let e = w.refused(publisher(), register("fraud", "1", 2));
    assert!(matches!(e, Error::VersionExists { .. }), "{e}");
    let e = w.refused(publisher(), register("other", "1", 1));
    assert!(matches!(e, Error::DuplicateDigest { .. }), "{e}");
    let mut bad = register("other", "1", 3);
    if let Command::RegisterModelVersion { digest, .. } = &mut bad {
        *digest = "sha256:abc".into();
    }
    let e = w.refused(publisher(), bad);
    assert!(
        matches!(
            e,
            Error::Invalid {
                what: "bundle digest",
                ..
            }
        ),
        "{e}"
    );
    let mut bad = register("other", "1", 3);
    if let Command::RegisterModelVersion { manifest, .. } = &mut bad {
        manifest.preferred = vec![Device::Gpu, Device::Gpu];
    }
    let e = w.refused(publisher(), bad);
    assert!(
        matches!(
            e,
            Error::Invalid {
                what: "hardware",
                ..
            }
        ),
        "{e}"
    );
    let e = w.refused(actor("vic", Role::Viewer), register("other", "1", 3));
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    w.ok(publisher(), register("other", "1", 3));
    assert_eq!(w.state.models().len(), 2);
}

#[test]
fn curation_tags_move_and_states_do_not_repeat() {
    let mut w = World::with_shelf();
    w.ok(publisher(), register("fraud", "2", 2));
    let tag = |v: &str| Command::Tag {
        model: "fraud".into(),
        version: v.into(),
        tag: "stable".into(),
    };
    w.ok(publisher(), tag("1"));
    let e = w.refused(publisher(), tag("1"));
    assert!(matches!(e, Error::VersionAlreadyInState { .. }), "{e}");
    w.ok(publisher(), tag("2"));
    let tags = |w: &World, v: &str| {
        w.state
            .version("fraud", v)
            .map(|v| v.tags.clone())
            .unwrap_or_default()
    };
    assert!(tags(&w, "1").is_empty());
    assert!(tags(&w, "2").contains("stable"));
    let untag = Command::Untag {
        model: "fraud".into(),
        tag: "stable".into(),
    };
    w.ok(publisher(), untag.clone());
    let e = w.refused(publisher(), untag);
    assert!(matches!(e, Error::UnknownTag { .. }), "{e}");
    let on = |v: &str| Command::PutOnShelf {
        model: "fraud".into(),
        version: v.into(),
    };
    let e = w.refused(publisher(), on("1"));
    assert!(matches!(e, Error::VersionAlreadyInState { .. }), "{e}");
    w.ok(
        publisher(),
        Command::Deprecate {
            model: "fraud".into(),
            version: "1".into(),
        },
    );
    let e = w.refused(
        publisher(),
        Command::Deprecate {
            model: "fraud".into(),
            version: "1".into(),
        },
    );
    assert!(matches!(e, Error::VersionAlreadyInState { .. }), "{e}");
}

#[test]
fn tokens_authenticate_until_revoked() {
    let mut w = World::new();
    let create = |id: &str, name: &str, role, secret: &str| Command::CreateToken {
        id: id.into(),
        name: name.into(),
        role,
        secret_hash: hash_secret(secret),
    };
    w.ok(
        admin(),
        create("t-ann", "ann", Role::Approver, "s3cret-ann"),
    );
    w.ok(
        admin(),
        create("t-pat", "pat", Role::Publisher, "s3cret-pat"),
    );
    assert_eq!(hash_secret("abc").len(), 64);
    assert!(!w.state.tokens()["t-ann"].secret_hash.contains("s3cret"));
    let e = w.refused(admin(), create("t-ann", "x", Role::Viewer, "other"));
    assert!(matches!(e, Error::TokenExists { .. }), "{e}");
    let e = w.refused(admin(), create("t-x", "x", Role::Viewer, "s3cret-pat"));
    assert!(matches!(e, Error::DuplicateSecret), "{e}");
    let e = w.refused(
        actor("olga", Role::Operator),
        create("t-x", "x", Role::Admin, "x"),
    );
    assert!(
        matches!(
            e,
            Error::Forbidden {
                needed: Role::Admin,
                ..
            }
        ),
        "{e}"
    );

    let ann = w
        .state
        .authenticate("s3cret-ann")
        .unwrap_or_else(|| panic!("ann's token works"));
    assert_eq!(
        (ann.name.as_str(), ann.role, ann.token_id.as_deref()),
        ("ann", Role::Approver, Some("t-ann"))
    );
    assert_eq!(w.state.authenticate("wrong"), None);
    // A forged role or name on a real token is refused.
    let forged = Actor {
        role: Role::Admin,
        ..ann.clone()
    };
    let e = w.refused(forged, policy("prod", 1, Role::Approver));
    assert!(matches!(e, Error::ActorMismatch { .. }), "{e}");
    let e = w.refused(
        Actor {
            token_id: Some("t-none".into()),
            ..ann.clone()
        },
        policy("p", 1, Role::Approver),
    );
    assert!(matches!(e, Error::UnknownToken { .. }), "{e}");

    // Holders may revoke their own token, not another's.
    let pat = w
        .state
        .authenticate("s3cret-pat")
        .unwrap_or_else(|| panic!("pat's token works"));
    let e = w.refused(pat.clone(), Command::RevokeToken { id: "t-ann".into() });
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    w.ok(pat.clone(), Command::RevokeToken { id: "t-pat".into() });
    assert_eq!(w.state.authenticate("s3cret-pat"), None);
    // An entry proposed before the revocation is refused when applied.
    let e = w.refused(pat, register("m", "1", 1));
    assert!(matches!(e, Error::TokenRevoked { .. }), "{e}");
    let e = w.refused(admin(), Command::RevokeToken { id: "t-pat".into() });
    assert!(matches!(e, Error::TokenRevoked { .. }), "{e}");
    w.ok(admin(), Command::RevokeToken { id: "t-ann".into() });
    assert!(w.state.tokens()["t-ann"].revoked_at_ms.is_some());
    assert!(w.state.audit().iter().all(|a| !a.detail.contains("s3cret")));
}

#[test]
fn snapshots_round_trip() {
    let mut w = World::with_shelf();
    w.ok(
        actor("op", Role::Operator),
        Command::JoinNode {
            node: node_spec("n1", "a", 8000, 0),
        },
    );
    w.ok(
        actor("op", Role::Operator),
        deploy("fraud", "1", "staging", 1),
    );
    w.ok(
        actor("sam", Role::Publisher),
        request("fraud", "1", "production"),
    );
    let bytes = w.state.snapshot().unwrap_or_else(|e| panic!("{e}"));
    let restored = State::restore(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(restored, w.state);
    let e = State::restore(b"{not json").err();
    assert!(matches!(e, Some(Error::Snapshot { .. })), "{e:?}");
    // A snapshot that breaks an invariant is refused too.
    let mut broken: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    broken["placements"][0]["node"] = "ghost".into();
    let bytes = serde_json::to_vec(&broken).unwrap_or_default();
    assert!(matches!(
        State::restore(&bytes),
        Err(Error::Snapshot { .. })
    ));
}

#[test]
fn the_role_table() {
    // Every command's minimum role, as documented in the crate's summary.
    use Role::*;
    let table = [
        (Command::RevokeToken { id: "t".into() }, Viewer),
        (register("m", "1", 1), Publisher),
        (request("m", "1", "p"), Publisher),
        (Command::Withdraw { request: 1 }, Publisher),
        (decide(1, true, ""), Approver),
        (deploy("m", "1", "p", 1), Operator),
        (Command::MarkNodeDown { node: "n".into() }, Operator),
        (policy("p", 1, Approver), Admin),
        (Command::SetHeartbeatGrace { grace_ms: 1000 }, Admin),
    ];
    for (command, role) in table {
        assert_eq!(command.required_role(), role, "{command:?}");
    }
}

#[test]
fn only_trusted_publisher_keys_reach_the_shelf() {
    let mut w = World::new();
    // Nothing is trusted on a new cluster.
    let e = w.refused(publisher(), register("m", "1", 1));
    assert!(matches!(e, Error::UntrustedKey { .. }), "{e}");
    let e = w.refused(publisher(), trust_publisher());
    assert!(matches!(e, Error::Forbidden { .. }), "{e}");
    w.ok(admin(), trust_publisher());
    w.ok(publisher(), register("m", "1", 1));
    // Distrusting keeps what was registered and refuses what comes next.
    w.ok(
        admin(),
        Command::DistrustKey {
            key: hex64(PUBLISHER_KEY),
        },
    );
    assert!(w.state.models()["m"].versions.contains_key("1"));
    let e = w.refused(publisher(), register("m", "2", 2));
    assert!(matches!(e, Error::UntrustedKey { .. }), "{e}");
    let e = w.refused(
        admin(),
        Command::DistrustKey {
            key: hex64(PUBLISHER_KEY),
        },
    );
    assert!(matches!(e, Error::UnknownKey { .. }), "{e}");
}

#[test]
fn tensor_names_of_exported_models_are_accepted() {
    let mut w = World::with_shelf();
    // Names as real exported graphs carry them (Caffe2's `gpu_0/data_0`, TensorFlow's
    // `input:0`): the bundle's manifest allows them, so the shelf does too.
    let mut real = register("shufflenet", "1", 7);
    if let Command::RegisterModelVersion { manifest, .. } = &mut real {
        manifest.inputs[0].name = "gpu_0/data_0".into();
        manifest.outputs[0].name = "softmax:0".into();
    }
    w.ok(publisher(), real);
    let mut bad = register("other", "1", 8);
    if let Command::RegisterModelVersion { manifest, .. } = &mut bad {
        manifest.inputs[0].name = "a\nb".into();
    }
    let e = w.refused(publisher(), bad);
    assert!(
        matches!(
            e,
            Error::Invalid {
                what: "tensor name",
                ..
            }
        ),
        "{e}"
    );
}
