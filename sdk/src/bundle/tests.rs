//! Tests of the bundle format: round trips, and that every kind of damage is refused by name.

use super::*;
use crate::manifest::{GraphEncoding, ModelInfo};
use crate::types::{Datatype, TensorSpec};
use proptest::prelude::*;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn manifest() -> Manifest {
    Manifest {
        model: ModelInfo {
            name: "tiny".into(),
            version: "1".into(),
            description: None,
        },
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: Datatype::Fp32,
            shape: vec![-1, 2],
        }],
        outputs: vec![TensorSpec {
            name: "y".into(),
            datatype: Datatype::Fp32,
            shape: vec![-1, 1],
        }],
        graphs: vec![GraphSpec {
            name: "model".into(),
            file: "m.onnx".into(),
            encoding: GraphEncoding::Onnx,
            shapes: Default::default(),
            weights: None,
        }],
        ..Manifest::default()
    }
}

fn files() -> Vec<(String, Vec<u8>)> {
    vec![("m.onnx".to_string(), b"onnx bytes".to_vec())]
}

fn small_bundle() -> Vec<u8> {
    pack_parts(&manifest(), b"\0asm wasm", &files(), &key(1)).expect("pack")
}

fn read_err(bytes: &[u8]) -> Error {
    match Bundle::read(bytes) {
        Ok(_) => panic!("bundle of {} bytes should not read", bytes.len()),
        Err(e) => e,
    }
}

/// Offset of the first byte of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

#[test]
fn round_trip() {
    let mut m = manifest();
    m.component.file = "build/served.wasm".into();
    m.graphs.push(GraphSpec {
        name: "same-file".into(),
        file: "m.onnx".into(),
        encoding: GraphEncoding::Onnx,
        shapes: Default::default(),
        weights: None,
    });
    m.graphs.push(GraphSpec {
        name: "other".into(),
        file: "weights/b.onnx".into(),
        encoding: GraphEncoding::Openvino,
        shapes: Default::default(),
        weights: None,
    });
    let mut given = files();
    given.push(("weights/b.onnx".into(), vec![7; 1000]));
    let bytes = pack_parts(&m, b"component", &given, &key(1)).expect("pack");
    assert_eq!(&bytes[..8], b"SOPHONB\0");

    let bundle = Bundle::read(&bytes).expect("read");
    assert_eq!(bundle.component, b"component");
    assert_eq!(bundle.manifest.component.file, COMPONENT_ENTRY);
    m.component.file = COMPONENT_ENTRY.into();
    assert_eq!(bundle.manifest, m);
    assert_eq!(
        bundle.graph_bytes(&m.graphs[1]).expect("graph"),
        b"onnx bytes"
    );
    assert_eq!(
        bundle.graph_bytes(&m.graphs[2]).expect("graph"),
        &[7; 1000][..]
    );
    assert_eq!(bundle.files.len(), 2);
    assert_eq!(bundle.publisher, key(1).verifying_key());
    bundle
        .verify_publisher(&[key(2).verifying_key(), key(1).verifying_key()])
        .expect("trusted");
    assert_eq!(bundle.digest_hex().len(), 64);

    // Packing is deterministic, and the digest changes with the contents.
    assert_eq!(
        pack_parts(&m, b"component", &given, &key(1)).expect("pack"),
        bytes
    );
    let other = pack_parts(&m, b"componenT", &given, &key(1)).expect("pack");
    assert_ne!(Bundle::read(&other).expect("read").digest, bundle.digest);
}

#[test]
fn digest_is_sha256_of_the_header() {
    let bytes = small_bundle();
    let bundle = Bundle::read(&bytes).expect("read");
    let (header, _, _) = read_index(&bytes).expect("index");
    assert_eq!(bundle.digest, <[u8; 32]>::from(Sha256::digest(header)));
    // Header: magic, version 1, three entries in ascending order.
    assert_eq!(&header[8..10], &[1, 0]);
    assert_eq!(&header[10..14], &[3, 0, 0, 0]);
    let names: Vec<usize> = [COMPONENT_ENTRY, MANIFEST_ENTRY, "models/m.onnx"]
        .iter()
        .map(|n| find(header, n.as_bytes()))
        .collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
}

#[test]
fn every_single_byte_flip_is_refused() {
    let bytes = small_bundle();
    for position in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut damaged = bytes.clone();
            damaged[position] ^= mask;
            assert!(
                Bundle::read(&damaged).is_err(),
                "flip {mask:#04x} at byte {position} went unnoticed"
            );
        }
    }
}

#[test]
fn every_truncation_is_refused() {
    let bytes = small_bundle();
    for len in 0..bytes.len() {
        let e = read_err(&bytes[..len]);
        assert!(matches!(e, Error::Truncated { .. }), "cut at {len}: {e}");
    }
    let e = read_err(&bytes[..bytes.len() - 1]);
    assert!(e.to_string().starts_with("bundle is truncated: "), "{e}");
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = small_bundle();
    bytes.push(0);
    let e = read_err(&bytes);
    assert!(matches!(e, Error::TrailingBytes { count: 1 }), "{e}");
    assert!(e.to_string().contains("trailing"), "{e}");
}

#[test]
fn bad_magic_and_unknown_version_say_so() {
    let mut bytes = small_bundle();
    bytes[0] = b'X';
    assert!(matches!(read_err(&bytes), Error::BadMagic));
    assert!(matches!(read_err(b"PK\x03\x04"), Error::BadMagic));

    let mut bytes = small_bundle();
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    let e = read_err(&bytes);
    assert!(
        matches!(
            e,
            Error::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ),
        "{e}"
    );
    let message = e.to_string();
    assert!(message.contains("version 2"), "{message}");
    assert!(message.contains("reads version 1"), "{message}");
}

#[test]
fn tampered_parts_are_named() {
    let bytes = small_bundle();
    for (needle, part) in [
        (&b"onnx bytes"[..], "models/m.onnx"),
        (&b"\0asm wasm"[..], COMPONENT_ENTRY),
        (&b"[model]"[..], MANIFEST_ENTRY),
    ] {
        let mut damaged = bytes.clone();
        damaged[find(&bytes, needle) + 1] ^= 0x20;
        let e = read_err(&damaged);
        assert!(
            matches!(&e, Error::DigestMismatch { part: p } if p == part),
            "{e}"
        );
        assert!(e.to_string().contains(part), "{e}");
    }
}

#[test]
fn a_swapped_publisher_key_is_a_bad_signature() {
    let mut bytes = small_bundle();
    let at = bytes.len() - TRAILER_LEN;
    bytes[at..at + 32].copy_from_slice(key(2).verifying_key().as_bytes());
    let e = read_err(&bytes);
    assert!(matches!(e, Error::BadSignature), "{e}");
    assert!(e.to_string().contains("signature"), "{e}");
}

#[test]
fn a_changed_index_hash_is_a_bad_signature() {
    // Rewriting a part and its index hash together still breaks the signature.
    let bytes = small_bundle();
    let (_, entries, _) = read_index(&bytes).expect("index");
    let component = entries
        .iter()
        .find(|e| e.name == COMPONENT_ENTRY)
        .expect("entry");
    let old_hash = component.sha256.to_vec();
    let hash_at = find(&bytes, &old_hash);
    let data_at = find(&bytes, b"\0asm wasm");
    let mut damaged = bytes.clone();
    damaged[data_at..data_at + 9].copy_from_slice(b"\0asm evil");
    damaged[hash_at..hash_at + 32].copy_from_slice(&Sha256::digest(b"\0asm evil"));
    assert!(matches!(read_err(&damaged), Error::BadSignature));
}

#[test]
fn a_zeroed_trailer_is_unsigned() {
    let mut bytes = small_bundle();
    let at = bytes.len() - TRAILER_LEN;
    bytes[at..].fill(0);
    let e = read_err(&bytes);
    assert!(matches!(e, Error::Unsigned), "{e}");
    assert!(e.to_string().contains("not signed"), "{e}");
}

#[test]
fn untrusted_publisher_is_named() {
    let bundle = Bundle::read(&small_bundle()).expect("read");
    let e = bundle
        .verify_publisher(&[key(2).verifying_key()])
        .expect_err("untrusted");
    let hex = crate::keys::public_key_hex(&key(1).verifying_key());
    assert!(matches!(&e, Error::UntrustedPublisher { key_hex } if *key_hex == hex));
    assert!(e.to_string().contains(&hex), "{e}");
    assert!(bundle.verify_publisher(&[]).is_err());
}

#[test]
fn packer_requires_exactly_the_manifest_files() {
    let e = pack_parts(&manifest(), b"c", &[], &key(1)).expect_err("missing");
    assert!(
        matches!(&e, Error::MissingPart { name } if name == "models/m.onnx"),
        "{e}"
    );
    let mut extra = files();
    extra.push(("stray.bin".into(), vec![1]));
    let e = pack_parts(&manifest(), b"c", &extra, &key(1)).expect_err("extra");
    assert!(e.to_string().contains("models/stray.bin"), "{e}");
    let mut twice = files();
    twice.push(twice[0].clone());
    assert!(pack_parts(&manifest(), b"c", &twice, &key(1)).is_err());
    let mut bad = manifest();
    bad.inputs.clear();
    let e = pack_parts(&bad, b"c", &files(), &key(1)).expect_err("invalid");
    assert!(matches!(e, Error::Manifest(_)), "{e}");
}

/// Signs hand-made entries, bypassing the packer's checks, to test the reader's.
fn signed(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let owned: Vec<(String, &[u8])> = entries.iter().map(|(n, d)| (n.to_string(), *d)).collect();
    write_bundle(&owned, &key(1)).expect("write")
}

#[test]
fn reader_checks_parts_against_the_manifest() {
    let text = manifest().to_toml().expect("toml");
    let m = text.as_bytes();
    let e = read_err(&signed(&[(COMPONENT_ENTRY, b"c"), (MANIFEST_ENTRY, m)]));
    assert!(
        matches!(&e, Error::MissingPart { name } if name == "models/m.onnx"),
        "{e}"
    );
    let e = read_err(&signed(&[(MANIFEST_ENTRY, m), ("models/m.onnx", b"o")]));
    assert!(
        matches!(&e, Error::MissingPart { name } if name == COMPONENT_ENTRY),
        "{e}"
    );
    let e = read_err(&signed(&[(COMPONENT_ENTRY, b"c"), ("models/m.onnx", b"o")]));
    assert!(
        matches!(&e, Error::MissingPart { name } if name == MANIFEST_ENTRY),
        "{e}"
    );
    let e = read_err(&signed(&[
        (COMPONENT_ENTRY, b"c"),
        (MANIFEST_ENTRY, m),
        ("models/m.onnx", b"o"),
        ("models/z", b"z"),
    ]));
    assert!(
        matches!(&e, Error::UnexpectedPart { name } if name == "models/z"),
        "{e}"
    );
    let e = read_err(&signed(&[
        (COMPONENT_ENTRY, b"c"),
        ("extra", b"x"),
        (MANIFEST_ENTRY, m),
    ]));
    assert!(
        matches!(&e, Error::UnexpectedPart { name } if name == "extra"),
        "{e}"
    );
    let e = read_err(&signed(&[
        (COMPONENT_ENTRY, b"c"),
        (MANIFEST_ENTRY, b"[model]"),
    ]));
    assert!(matches!(e, Error::Manifest(_)), "{e}");
    let e = read_err(&signed(&[
        (COMPONENT_ENTRY, b"c"),
        (MANIFEST_ENTRY, b"\xff"),
    ]));
    assert!(e.to_string().contains("UTF-8"), "{e}");
    let ok = signed(&[
        (COMPONENT_ENTRY, b"c"),
        (MANIFEST_ENTRY, m),
        ("models/m.onnx", b"o"),
    ]);
    Bundle::read(&ok).expect("hand-made bundle is valid");
}

#[test]
fn reader_requires_a_canonical_index() {
    let unsorted = signed(&[(MANIFEST_ENTRY, b"m"), (COMPONENT_ENTRY, b"c")]);
    assert!(read_err(&unsorted).to_string().contains("ascending"));
    let duplicate = signed(&[(COMPONENT_ENTRY, b"c"), (COMPONENT_ENTRY, b"c")]);
    assert!(matches!(read_err(&duplicate), Error::Malformed { .. }));
    let empty = signed(&[]);
    assert!(matches!(read_err(&empty), Error::Malformed { .. }));
}

#[test]
fn huge_claims_are_refused_without_allocating() {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&1u16.to_le_bytes());
    let mut many = header.clone();
    many.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(read_err(&many), Error::Malformed { .. }));

    let mut big = header.clone();
    big.extend_from_slice(&1u32.to_le_bytes());
    big.extend_from_slice(&1u16.to_le_bytes());
    big.push(b'a');
    big.extend_from_slice(&u64::MAX.to_le_bytes());
    big.extend_from_slice(&[0; 32]);
    let e = read_err(&big);
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(e.to_string().contains(&u64::MAX.to_string()), "{e}");

    let mut long_name = header;
    long_name.extend_from_slice(&1u32.to_le_bytes());
    long_name.extend_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(read_err(&long_name), Error::Malformed { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_flip_anywhere_is_refused(position in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let bytes = small_bundle();
        let mut damaged = bytes.clone();
        damaged[position.index(bytes.len())] ^= mask;
        prop_assert!(Bundle::read(&damaged).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Bundle::read(&bytes);
        let mut prefixed = MAGIC.to_vec();
        prefixed.extend_from_slice(&1u16.to_le_bytes());
        prefixed.extend_from_slice(&bytes);
        prop_assert!(Bundle::read(&prefixed).is_err());
    }

    #[test]
    fn contents_round_trip(
        component in prop::collection::vec(any::<u8>(), 0..256),
        model in prop::collection::vec(any::<u8>(), 0..256),
        seed in any::<u8>(),
    ) {
        let given = vec![("m.onnx".to_string(), model.clone())];
        let bytes = pack_parts(&manifest(), &component, &given, &key(seed)).expect("pack");
        let bundle = Bundle::read(&bytes).expect("read");
        prop_assert_eq!(bundle.component, component);
        prop_assert_eq!(&bundle.files["m.onnx"], &model);
        prop_assert_eq!(bundle.publisher, key(seed).verifying_key());
    }
}

/// Stream `bytes` in chunks of `chunk` bytes.
fn stream(bytes: &[u8], chunk: usize) -> Result<StreamedBundle> {
    let mut v = StreamVerifier::new();
    for piece in bytes.chunks(chunk.max(1)) {
        v.update(piece)?;
    }
    v.finish()
}

#[test]
fn streaming_verifies_what_read_verifies() {
    let bytes = small_bundle();
    let read = Bundle::read(&bytes).expect("read");
    for chunk in [1, 2, 7, 64, 4096] {
        let streamed = stream(&bytes, chunk).expect("stream");
        assert_eq!(streamed.digest, read.digest);
        assert_eq!(streamed.publisher, read.publisher);
        assert_eq!(streamed.manifest, read.manifest);
        assert_eq!(streamed.len, bytes.len() as u64);
    }
    // Truncations and trailing bytes, whatever the chunking.
    for cut in 0..bytes.len() {
        assert!(stream(&bytes[..cut], 5).is_err(), "cut at {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        stream(&longer, 3),
        Err(Error::TrailingBytes { count: 1 })
    ));
    // The same named errors as `read` for damaged parts and signatures.
    let mut tampered = bytes.clone();
    let at = find(&tampered, b"onnx bytes");
    tampered[at] ^= 1;
    assert!(matches!(
        stream(&tampered, 4),
        Err(Error::DigestMismatch { .. })
    ));
    let n = tampered.len();
    tampered[n - 1] ^= 1;
    assert!(matches!(stream(&tampered, 4), Err(Error::BadSignature)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn streaming_agrees_with_read_on_damage(
        position in any::<prop::sample::Index>(),
        mask in 0u8..=255,
        cut in any::<prop::sample::Index>(),
        chunk in 1usize..300,
    ) {
        let mut bytes = small_bundle();
        let len = bytes.len();
        bytes[position.index(len)] ^= mask;
        // Half the cases also cut the bundle short.
        if mask % 2 == 1 {
            bytes.truncate(cut.index(len + 1));
        }
        let read = Bundle::read(&bytes);
        let streamed = stream(&bytes, chunk);
        prop_assert_eq!(read.is_ok(), streamed.is_ok(), "read {:?} / stream {:?}", read.as_ref().err(), streamed.as_ref().err());
        if let (Ok(r), Ok(s)) = (read, streamed) {
            prop_assert_eq!(r.digest, s.digest);
        }
    }

    #[test]
    fn streaming_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
        let mut prefixed = MAGIC.to_vec();
        prefixed.extend_from_slice(&1u16.to_le_bytes());
        prefixed.extend_from_slice(&bytes);
        prop_assert!(stream(&prefixed, chunk).is_err());
        let _ = stream(&bytes, chunk);
    }
}

#[test]
fn label_files_travel_signed_and_are_checked() {
    let mut m = manifest();
    m.labels.insert("y".into(), "labels/y.txt".into());
    let mut with_labels = files();
    with_labels.push(("labels/y.txt".to_string(), b"cat\ndog\n".to_vec()));
    let bytes = pack_parts(&m, b"\0asm wasm", &with_labels, &key(1)).expect("pack");
    let bundle = Bundle::read(&bytes).expect("read");
    assert_eq!(bundle.manifest.labels["y"], "labels/y.txt");
    assert_eq!(bundle.files["labels/y.txt"], b"cat\ndog\n");

    // The labels file must be there, and no file may be there that nothing names.
    let missing = pack_parts(&m, b"\0asm wasm", &files(), &key(1)).expect_err("no labels file");
    assert!(missing.to_string().contains("labels/y.txt"), "{missing}");
    let stray = pack_parts(&manifest(), b"\0asm wasm", &with_labels, &key(1))
        .expect_err("a file nothing names");
    assert!(stray.to_string().contains("labels/y.txt"), "{stray}");

    // Labels name a declared, numeric output, in a file of their own.
    let refused = |edit: &dyn Fn(&mut Manifest), says: &str| {
        let mut m = manifest();
        edit(&mut m);
        let e = m.validate().expect_err("invalid labels").to_string();
        assert!(e.contains(says), "{e:?} lacks {says:?}");
    };
    refused(
        &|m| {
            m.labels.insert("nope".into(), "l.txt".into());
        },
        "names output `nope`, which the manifest does not declare",
    );
    refused(
        &|m| {
            m.outputs[0].datatype = Datatype::Bytes;
            m.labels.insert("y".into(), "l.txt".into());
        },
        "a BYTES output",
    );
    refused(
        &|m| {
            m.labels.insert("y".into(), "m.onnx".into());
        },
        "is also a graph's file",
    );
    refused(
        &|m| {
            m.labels.insert("y".into(), "../l.txt".into());
        },
        "output `y` labels",
    );
}
