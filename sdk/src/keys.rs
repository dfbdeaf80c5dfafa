//! Publisher keys: ed25519 signing keys that sign bundles, and the public keys nodes trust.
//!
//! Keys are stored as one line of text, a label and 64 hex digits:
//! `sophon-ed25519-secret <hex>` for a signing key (written with mode 0600 on unix, never over an
//! existing file) and `sophon-ed25519-public <hex>` for a public key. The parsers also accept the
//! bare hex, so a public key can be passed on a command line.

use crate::error::{Error, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::fs;
use std::io::Write;
use std::path::Path;

/// Label of a signing-key line.
pub const SECRET_LABEL: &str = "sophon-ed25519-secret";
/// Label of a public-key line.
pub const PUBLIC_LABEL: &str = "sophon-ed25519-public";

/// A fresh signing key from the operating system's random source.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// The public key as 64 lowercase hex digits.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

/// The signing-key file line, `sophon-ed25519-secret <hex>`.
pub fn format_signing_key(key: &SigningKey) -> String {
    format!("{SECRET_LABEL} {}\n", hex::encode(key.to_bytes()))
}

/// The public-key file line, `sophon-ed25519-public <hex>`.
pub fn format_public_key(key: &VerifyingKey) -> String {
    format!("{PUBLIC_LABEL} {}\n", public_key_hex(key))
}

/// Parses a signing key from its file line (or bare hex).
pub fn parse_signing_key(text: &str) -> Result<SigningKey> {
    let bytes = parse_line(text, SECRET_LABEL)?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// Parses a public key from its file line (or bare hex).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey> {
    let bytes = parse_line(text, PUBLIC_LABEL)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| {
        Error::Key(
            "the public key is not a valid ed25519 point: copy it again from the publisher".into(),
        )
    })
}

fn parse_line(text: &str, label: &str) -> Result<[u8; 32]> {
    let text = text.trim();
    let hex_part = match text.split_once(char::is_whitespace) {
        Some((found, rest)) if found == label => rest.trim(),
        Some((found, _)) => {
            return Err(Error::Key(format!(
                "expected a `{label}` key, found `{}`: use the right key file",
                found.chars().take(32).collect::<String>()
            )));
        }
        None => text,
    };
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| {
        Error::Key(format!(
            "expected `{label} <64 hex digits>`: the key is malformed"
        ))
    })?;
    Ok(bytes)
}

/// Writes a signing key to a new file, readable only by its owner on unix. Refuses to overwrite.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Key(format!(
                "{} already exists: remove it first or write the new key elsewhere",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(path, e))?;
    }
    file.write_all(format_signing_key(key).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// Reads a signing key written by [`write_signing_key`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let text = read_key_file(path)?;
    parse_signing_key(&text).map_err(|e| in_file(path, e))
}

/// Writes a public key file (overwriting any existing one).
pub fn write_public_key(path: &Path, key: &VerifyingKey) -> Result<()> {
    fs::write(path, format_public_key(key)).map_err(|e| Error::io(path, e))
}

/// Reads a public key written by [`write_public_key`].
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let text = read_key_file(path)?;
    parse_public_key(&text).map_err(|e| in_file(path, e))
}

/// Key files are one short line; refuse anything large before reading it.
fn read_key_file(path: &Path) -> Result<String> {
    const MAX_KEY_FILE: u64 = 4096;
    let len = fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    if len > MAX_KEY_FILE {
        return Err(Error::Key(format!(
            "{} is {len} bytes, too large for a key file: check the path",
            path.display()
        )));
    }
    fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Key(message) => Error::Key(format!("{}: {message}", path.display())),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = generate();
        let secret = dir.path().join("publisher.key");
        let public = dir.path().join("publisher.pub");
        write_signing_key(&secret, &key).expect("write secret");
        write_public_key(&public, &key.verifying_key()).expect("write public");
        assert_eq!(
            read_signing_key(&secret).expect("read secret").to_bytes(),
            key.to_bytes()
        );
        assert_eq!(
            read_public_key(&public).expect("read public"),
            key.verifying_key()
        );
        let text = fs::read_to_string(&public).expect("read");
        assert!(text.starts_with("sophon-ed25519-public "));
        assert!(text.contains(&public_key_hex(&key.verifying_key())));
    }

    #[cfg(unix)]
    #[test]
    fn signing_key_is_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("publisher.key");
        write_signing_key(&path, &generate()).expect("write");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = write_signing_key(&path, &generate()).expect_err("exists");
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    #[test]
    fn parsers_accept_bare_hex_and_reject_the_wrong_label() {
        let key = generate();
        let hex = public_key_hex(&key.verifying_key());
        assert_eq!(parse_public_key(&hex).expect("bare"), key.verifying_key());
        let e = parse_public_key(&format_signing_key(&key)).expect_err("secret as public");
        assert!(e.to_string().contains("sophon-ed25519-public"), "{e}");
        let e = parse_signing_key(&format_public_key(&key.verifying_key())).expect_err("swap");
        assert!(e.to_string().contains("sophon-ed25519-secret"), "{e}");
        for bad in [
            "",
            "sophon-ed25519-public zz",
            "sophon-ed25519-public 00",
            &hex[..63],
        ] {
            assert!(parse_public_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reading_a_missing_or_huge_file_names_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pub");
        let e = read_public_key(&missing).expect_err("missing");
        assert!(e.to_string().contains("nope.pub"), "{e}");
        let huge = dir.path().join("huge.pub");
        fs::write(&huge, vec![b'a'; 10_000]).expect("write");
        let e = read_public_key(&huge).expect_err("huge");
        assert!(e.to_string().contains("too large"), "{e}");
        let garbage = dir.path().join("garbage.pub");
        fs::write(&garbage, "hello").expect("write");
        let e = read_public_key(&garbage).expect_err("garbage");
        assert!(e.to_string().contains("garbage.pub"), "{e}");
    }
}
