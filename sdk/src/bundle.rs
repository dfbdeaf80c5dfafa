//! The single-file bundle: a manifest, a Wasm component and model files, each with a SHA-256, all
//! covered by one digest that the publisher signs with ed25519.
//!
//! # Layout (format version 1; integers little-endian)
//!
//! ```text
//! magic        8 bytes   "SOPHONB\0"
//! version      u16       1
//! count        u32       number of entries, 3..=1024 for a valid bundle (at least 1 to parse)
//! count times, names strictly ascending (bytewise), so the index has one encoding:
//!   name_len   u16       1..=255
//!   name       name_len bytes of UTF-8: "manifest.toml", "component.wasm" or "models/<file>"
//!   size       u64       length of the entry's data
//!   sha256     32 bytes  SHA-256 of the entry's data
//! data         the entries' data, concatenated in index order
//! publisher    32 bytes  ed25519 public key
//! signature    64 bytes  ed25519 signature of SIGNING_CONTEXT || digest
//! ```
//!
//! The **digest** is SHA-256 of the header, the bytes from the magic to the end of the index: the
//! format version and every entry's (name, size, sha256) in their one canonical encoding. It pins
//! every byte of the file: the signature covers the digest, the digest covers each part's hash.
//!
//! [`Bundle::read`] is the verifier. It is plain code over a byte slice: every length is checked
//! against the bytes that remain before anything is sliced or allocated, counts and names are
//! capped, and trailing bytes are refused, so any input yields a [`Bundle`] or an [`Error`],
//! never a panic. It checks, in order: magic, version, index, exact length, signature, each part's
//! hash, then the manifest and that the parts are exactly the ones the manifest names.
//! Trusting the publisher is a separate step, [`Bundle::verify_publisher`].

use crate::error::{Error, Result};
use crate::manifest::{GraphSpec, Manifest};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The first eight bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"SOPHONB\0";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Prefix of the signed message; the rest is the 32-byte digest.
pub const SIGNING_CONTEXT: &[u8] = b"sophon-bundle-v1 digest\0";
/// Entry name of the manifest.
pub const MANIFEST_ENTRY: &str = "manifest.toml";
/// Entry name of the component.
pub const COMPONENT_ENTRY: &str = "component.wasm";
/// Prefix of model-file entry names.
pub const MODELS_PREFIX: &str = "models/";
/// Most entries an index may hold.
pub const MAX_ENTRIES: u32 = 1024;
/// Longest entry name, in bytes.
pub const MAX_ENTRY_NAME: usize = 255;
/// Largest manifest entry.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

const TRAILER_LEN: usize = 32 + 64;

/// A verified bundle.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub manifest: Manifest,
    pub component: Vec<u8>,
    /// Model files by the name the manifest gives them (its graphs' files and `[labels]`),
    /// without the `models/` prefix.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The signed bundle digest.
    pub digest: [u8; 32],
    /// The key that signed the digest.
    pub publisher: VerifyingKey,
}

impl Bundle {
    /// Parses and verifies a bundle; see the module page for what is checked.
    pub fn read(bytes: &[u8]) -> Result<Bundle> {
        let (header, entries, rest) = read_index(bytes)?;
        let digest: [u8; 32] = Sha256::digest(header).into();
        let publisher = verify_trailer(&digest, rest)?;

        let mut parts = Parts::default();
        let mut offset = 0usize;
        for entry in entries {
            // read_index checked that the sizes sum to the data length, so this is in bounds.
            let end = offset + entry.size;
            let data = rest
                .get(offset..end)
                .ok_or_else(|| Error::truncated(entry.name))?;
            offset = end;
            if Sha256::digest(data).as_slice() != entry.sha256 {
                return Err(Error::DigestMismatch {
                    part: entry.name.to_string(),
                });
            }
            parts.insert(entry.name, data)?;
        }
        let manifest_bytes = parts.manifest.ok_or_else(|| Error::MissingPart {
            name: MANIFEST_ENTRY.to_string(),
        })?;
        let manifest_text = std::str::from_utf8(manifest_bytes)
            .map_err(|_| Error::Manifest(format!("{MANIFEST_ENTRY} is not UTF-8: repack it")))?;
        let manifest = Manifest::from_toml(manifest_text)?;
        let component = parts.component.ok_or_else(|| Error::MissingPart {
            name: COMPONENT_ENTRY.to_string(),
        })?;
        let files = check_files(&manifest, parts.files)?;
        Ok(Bundle {
            manifest,
            component: component.to_vec(),
            files: files
                .into_iter()
                .map(|(name, data)| (name.to_string(), data.to_vec()))
                .collect(),
            digest,
            publisher,
        })
    }

    /// Reads and verifies the bundle file at `path`.
    pub fn read_file(path: &Path) -> Result<Bundle> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Bundle::read(&bytes)
    }

    /// Succeeds when the publisher is one of `trusted`.
    pub fn verify_publisher(&self, trusted: &[VerifyingKey]) -> Result<()> {
        verify_publisher(&self.publisher, trusted)
    }

    /// The bundle digest as 64 lowercase hex digits; it identifies the bundle's exact contents.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest)
    }

    /// The publisher key as 64 lowercase hex digits.
    pub fn publisher_hex(&self) -> String {
        crate::keys::public_key_hex(&self.publisher)
    }

    /// The bytes of a graph's model file.
    pub fn graph_bytes(&self, graph: &GraphSpec) -> Result<&[u8]> {
        self.file_bytes(&graph.file)
    }

    /// The bytes of a graph's weights file (OpenVINO IR), if it names one.
    pub fn weights_bytes(&self, graph: &GraphSpec) -> Result<Option<&[u8]>> {
        graph
            .weights
            .as_deref()
            .map(|w| self.file_bytes(w))
            .transpose()
    }

    fn file_bytes(&self, file: &str) -> Result<&[u8]> {
        self.files
            .get(file)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::MissingPart {
                name: format!("{MODELS_PREFIX}{file}"),
            })
    }
}

/// Succeeds when `publisher` is one of `trusted`.
fn verify_publisher(publisher: &VerifyingKey, trusted: &[VerifyingKey]) -> Result<()> {
    if trusted.contains(publisher) {
        Ok(())
    } else {
        Err(Error::UntrustedPublisher {
            key_hex: crate::keys::public_key_hex(publisher),
        })
    }
}

/// Writes a signed bundle. The manifest is validated and stored re-serialised, with its component
/// file renamed to `component.wasm` (the entry it is stored as). `files` holds each model file by
/// the name the manifest's graphs use; it must hold exactly those files.
pub fn pack_parts(
    manifest: &Manifest,
    component: &[u8],
    files: &[(String, Vec<u8>)],
    key: &SigningKey,
) -> Result<Vec<u8>> {
    let mut manifest = manifest.clone();
    manifest.component.file = COMPONENT_ENTRY.to_string();
    manifest.validate()?;
    let manifest_text = manifest.to_toml()?;

    let mut given = BTreeMap::new();
    for (name, data) in files {
        if given.insert(name.as_str(), data.as_slice()).is_some() {
            return Err(Error::Manifest(format!(
                "model file `{name}` was given twice: give each file once"
            )));
        }
    }
    let files = check_files(&manifest, given)?;

    let mut entries: Vec<(String, &[u8])> = vec![
        (MANIFEST_ENTRY.to_string(), manifest_text.as_bytes()),
        (COMPONENT_ENTRY.to_string(), component),
    ];
    entries.extend(
        files
            .into_iter()
            .map(|(file, data)| (format!("{MODELS_PREFIX}{file}"), data)),
    );
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    write_bundle(&entries, key)
}

/// Encodes sorted, uniquely named entries and signs them.
fn write_bundle(entries: &[(String, &[u8])], key: &SigningKey) -> Result<Vec<u8>> {
    let count = u32::try_from(entries.len())
        .ok()
        .filter(|n| *n <= MAX_ENTRIES)
        .ok_or_else(|| Error::malformed(format!("more than {MAX_ENTRIES} entries")))?;
    let mut header = Vec::new();
    header.extend_from_slice(&MAGIC);
    header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    for (name, data) in entries {
        let name_len = u16::try_from(name.len())
            .ok()
            .filter(|n| *n as usize <= MAX_ENTRY_NAME)
            .ok_or_else(|| Error::malformed(format!("entry name `{name}` is too long")))?;
        header.extend_from_slice(&name_len.to_le_bytes());
        header.extend_from_slice(name.as_bytes());
        header.extend_from_slice(&(data.len() as u64).to_le_bytes());
        header.extend_from_slice(&Sha256::digest(data));
    }
    let digest: [u8; 32] = Sha256::digest(&header).into();
    let signature = key.sign(&signed_message(&digest));

    let data_len: usize = entries.iter().map(|(_, data)| data.len()).sum();
    let mut out = Vec::with_capacity(header.len() + data_len + TRAILER_LEN);
    out.extend_from_slice(&header);
    for (_, data) in entries {
        out.extend_from_slice(data);
    }
    out.extend_from_slice(key.verifying_key().as_bytes());
    out.extend_from_slice(&signature.to_bytes());
    Ok(out)
}

fn signed_message(digest: &[u8; 32]) -> Vec<u8> {
    [SIGNING_CONTEXT, digest.as_slice()].concat()
}

/// One index entry, borrowed from the input.
struct Entry<'a> {
    name: &'a str,
    size: usize,
    sha256: &'a [u8],
}

/// A bounds-checked reader over the input.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n);
        match end.and_then(|end| self.bytes.get(self.pos..end)) {
            Some(slice) => {
                self.pos += n;
                Ok(slice)
            }
            None => Err(Error::truncated(format!(
                "it ends at byte {} inside {}",
                self.bytes.len(),
                what()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N]> {
        let slice = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }
}

/// Parses magic, version and index. Returns the header bytes, the entries, and everything after
/// the index, which is checked to be exactly the entries' data plus the trailer.
fn read_index(bytes: &[u8]) -> Result<(&[u8], Vec<Entry<'_>>, &[u8])> {
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            Error::truncated(format!("{} bytes, shorter than the magic", bytes.len()))
        } else {
            Error::BadMagic
        });
    }
    let (header_len, entries) = parse_header(bytes)?;
    let mut data_len: usize = 0;
    for entry in &entries {
        // A size that does not fit in the input is a truncation, however large it claims to be.
        data_len = data_len
            .checked_add(entry.size)
            .filter(|n| *n <= bytes.len())
            .ok_or_else(|| {
                Error::truncated(format!(
                    "entry `{}` claims {} bytes",
                    entry.name, entry.size
                ))
            })?;
    }
    let rest = &bytes[header_len..];
    let expected = data_len + TRAILER_LEN;
    if rest.len() < expected {
        return Err(Error::truncated(format!(
            "expected {} bytes in all, found {}",
            header_len + expected,
            bytes.len()
        )));
    }
    if rest.len() > expected {
        return Err(Error::TrailingBytes {
            count: (rest.len() - expected) as u64,
        });
    }
    Ok((&bytes[..header_len], entries, rest))
}

/// Parses magic, version and index from the start of `bytes`; returns the header's length and
/// the entries. Running out of bytes is [`Error::Truncated`] (a streaming reader waits for more).
fn parse_header(bytes: &[u8]) -> Result<(usize, Vec<Entry<'_>>)> {
    let mut r = Cursor { bytes, pos: 0 };
    let magic = r.take(MAGIC.len(), || "the magic".into())?;
    if magic != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = u16::from_le_bytes(r.array(|| "the format version".into())?);
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let count = u32::from_le_bytes(r.array(|| "the entry count".into())?);
    if count == 0 || count > MAX_ENTRIES {
        return Err(Error::malformed(format!(
            "{count} entries, expected 1 to {MAX_ENTRIES}"
        )));
    }
    let mut entries: Vec<Entry<'_>> = Vec::with_capacity(count as usize);
    for i in 0..count {
        let name_len = u16::from_le_bytes(r.array(|| format!("index entry {i}"))?) as usize;
        if name_len == 0 || name_len > MAX_ENTRY_NAME {
            return Err(Error::malformed(format!(
                "index entry {i} has a {name_len}-byte name, expected 1 to {MAX_ENTRY_NAME}"
            )));
        }
        let name = r.take(name_len, || format!("the name of index entry {i}"))?;
        let name = std::str::from_utf8(name)
            .map_err(|_| Error::malformed(format!("index entry {i} has a non-UTF-8 name")))?;
        let size = u64::from_le_bytes(r.array(|| format!("the size of entry `{name}`"))?);
        let sha256 = r.take(32, || format!("the sha-256 of entry `{name}`"))?;
        if let Some(previous) = entries.last()
            && previous.name >= name
        {
            return Err(Error::malformed(format!(
                "entry `{name}` follows `{}`: names must be unique and ascending",
                previous.name
            )));
        }
        let size = usize::try_from(size)
            .map_err(|_| Error::truncated(format!("entry `{name}` claims {size} bytes")))?;
        entries.push(Entry { name, size, sha256 });
    }
    Ok((r.pos, entries))
}

/// Checks the signature in the last [`TRAILER_LEN`] bytes of `rest` over `digest`.
fn verify_trailer(digest: &[u8; 32], rest: &[u8]) -> Result<VerifyingKey> {
    let trailer = rest
        .len()
        .checked_sub(TRAILER_LEN)
        .and_then(|start| rest.get(start..))
        .ok_or_else(|| Error::truncated("the signature trailer"))?;
    let (key, signature) = trailer.split_at(32);
    if trailer.iter().all(|b| *b == 0) {
        return Err(Error::Unsigned);
    }
    let key: [u8; 32] = key.try_into().map_err(|_| Error::BadSignature)?;
    let signature: [u8; 64] = signature.try_into().map_err(|_| Error::BadSignature)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| Error::BadSignature)?;
    key.verify_strict(&signed_message(digest), &Signature::from_bytes(&signature))
        .map_err(|_| Error::BadSignature)?;
    Ok(key)
}

/// The parts found in a bundle, by role.
#[derive(Default)]
struct Parts<'a> {
    manifest: Option<&'a [u8]>,
    component: Option<&'a [u8]>,
    files: BTreeMap<&'a str, &'a [u8]>,
}

impl<'a> Parts<'a> {
    fn insert(&mut self, name: &'a str, data: &'a [u8]) -> Result<()> {
        if name == MANIFEST_ENTRY {
            if data.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(Error::Manifest(format!(
                    "{MANIFEST_ENTRY} is {} bytes, more than {MAX_MANIFEST_BYTES}: shorten it",
                    data.len()
                )));
            }
            self.manifest = Some(data);
        } else if name == COMPONENT_ENTRY {
            self.component = Some(data);
        } else if let Some(file) = name.strip_prefix(MODELS_PREFIX) {
            self.files.insert(file, data);
        } else {
            return Err(Error::UnexpectedPart {
                name: name.to_string(),
            });
        }
        Ok(())
    }
}

/// Checks that `files` holds exactly the files the manifest's graphs name.
fn check_files<'a, V>(
    manifest: &Manifest,
    files: BTreeMap<&'a str, V>,
) -> Result<BTreeMap<&'a str, V>> {
    let named = manifest.files();
    for file in &named {
        if !files.contains_key(file) {
            return Err(Error::MissingPart {
                name: format!("{MODELS_PREFIX}{file}"),
            });
        }
    }
    if let Some(extra) = files.keys().find(|file| !named.contains(file)) {
        return Err(Error::UnexpectedPart {
            name: format!("{MODELS_PREFIX}{extra}"),
        });
    }
    Ok(files)
}

/// Largest possible header: the magic, version, count and [`MAX_ENTRIES`] longest entries.
const MAX_HEADER: usize = 8 + 2 + 4 + MAX_ENTRIES as usize * (2 + MAX_ENTRY_NAME + 8 + 32);

/// What a streamed bundle turned out to be, once [`StreamVerifier::finish`] verified it.
#[derive(Clone, Debug)]
pub struct StreamedBundle {
    pub manifest: Manifest,
    /// The signed bundle digest.
    pub digest: [u8; 32],
    /// The key that signed the digest.
    pub publisher: VerifyingKey,
    /// Bytes of the whole bundle.
    pub len: u64,
    /// Bytes of each model file, by the name the manifest's graphs use.
    pub files: BTreeMap<String, u64>,
}

impl StreamedBundle {
    /// The bundle digest as 64 lowercase hex digits.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest)
    }

    /// The publisher key as 64 lowercase hex digits.
    pub fn publisher_hex(&self) -> String {
        crate::keys::public_key_hex(&self.publisher)
    }

    /// Succeeds when the publisher is one of `trusted`.
    pub fn verify_publisher(&self, trusted: &[VerifyingKey]) -> Result<()> {
        verify_publisher(&self.publisher, trusted)
    }
}

/// An index entry, owned.
struct StreamEntry {
    name: String,
    size: u64,
    sha256: [u8; 32],
}

/// Verifies a bundle as its bytes arrive, holding only the header, the manifest and the trailer:
/// memory stays flat whatever the size of the bundle. It checks what [`Bundle::read`] checks and
/// refuses what it refuses (a part whose hash differs is reported once the signature is checked,
/// in the same order as `read`).
pub struct StreamVerifier {
    /// Bytes of the header until it parses; then the trailer's bytes.
    buf: Vec<u8>,
    entries: Vec<StreamEntry>,
    digest: [u8; 32],
    /// The entry now being received, and how much of it is left.
    current: usize,
    left: u64,
    hasher: Sha256,
    manifest: Vec<u8>,
    /// The first part whose hash did not match.
    mismatch: Option<String>,
    len: u64,
    header_done: bool,
}

impl Default for StreamVerifier {
    fn default() -> Self {
        StreamVerifier::new()
    }
}

impl StreamVerifier {
    /// A verifier that has seen nothing yet.
    pub fn new() -> StreamVerifier {
        StreamVerifier {
            buf: Vec::new(),
            entries: Vec::new(),
            digest: [0; 32],
            current: 0,
            left: 0,
            hasher: Sha256::new(),
            manifest: Vec::new(),
            mismatch: None,
            len: 0,
            header_done: false,
        }
    }

    /// Take the next bytes of the bundle.
    pub fn update(&mut self, mut chunk: &[u8]) -> Result<()> {
        self.len += chunk.len() as u64;
        if !self.header_done {
            self.buf.extend_from_slice(chunk);
            if self.buf.len() >= MAGIC.len() && self.buf[..MAGIC.len()] != MAGIC {
                return Err(Error::BadMagic);
            }
            let parsed = match parse_header(&self.buf) {
                Ok((len, entries)) => {
                    let entries = entries
                        .into_iter()
                        .map(|e| StreamEntry {
                            name: e.name.to_string(),
                            size: e.size as u64,
                            sha256: e.sha256.try_into().unwrap_or([0; 32]),
                        })
                        .collect::<Vec<_>>();
                    Some((len, entries))
                }
                Err(Error::Truncated { .. }) if self.buf.len() < MAX_HEADER => None,
                Err(e) => return Err(e),
            };
            let Some((header_len, entries)) = parsed else {
                return Ok(());
            };
            self.digest = Sha256::digest(&self.buf[..header_len]).into();
            let rest = self.buf.split_off(header_len);
            self.buf.clear();
            self.entries = entries;
            self.header_done = true;
            self.start_entry(0)?;
            // Feed what came after the header.
            self.len -= rest.len() as u64;
            return self.update(&rest);
        }
        while !chunk.is_empty() {
            if self.current >= self.entries.len() {
                // The trailer: exactly TRAILER_LEN bytes, then nothing.
                self.buf.extend_from_slice(chunk);
                if self.buf.len() > TRAILER_LEN {
                    return Err(Error::TrailingBytes {
                        count: (self.buf.len() - TRAILER_LEN) as u64,
                    });
                }
                return Ok(());
            }
            let n = (self.left.min(chunk.len() as u64)) as usize;
            let (data, next) = chunk.split_at(n);
            self.hasher.update(data);
            if self.entries[self.current].name == MANIFEST_ENTRY {
                self.manifest.extend_from_slice(data);
            }
            self.left -= n as u64;
            chunk = next;
            if self.left == 0 {
                self.end_entry();
                self.start_entry(self.current + 1)?;
            }
        }
        Ok(())
    }

    fn start_entry(&mut self, index: usize) -> Result<()> {
        self.current = index;
        let Some(entry) = self.entries.get(index) else {
            return Ok(());
        };
        if entry.name == MANIFEST_ENTRY && entry.size > MAX_MANIFEST_BYTES {
            return Err(Error::Manifest(format!(
                "{MANIFEST_ENTRY} is {} bytes, more than {MAX_MANIFEST_BYTES}: shorten it",
                entry.size
            )));
        }
        self.left = entry.size;
        self.hasher = Sha256::new();
        if entry.size == 0 {
            self.end_entry();
            return self.start_entry(index + 1);
        }
        Ok(())
    }

    fn end_entry(&mut self) {
        let hash = std::mem::take(&mut self.hasher).finalize();
        let entry = &self.entries[self.current];
        if hash.as_slice() != entry.sha256 && self.mismatch.is_none() {
            self.mismatch = Some(entry.name.clone());
        }
    }

    /// Check the end of the bundle: its length, signature, part hashes and manifest.
    pub fn finish(self) -> Result<StreamedBundle> {
        if !self.header_done {
            return Err(
                if self.buf.len() < MAGIC.len() && MAGIC.starts_with(&self.buf) {
                    Error::truncated(format!("{} bytes, shorter than the magic", self.buf.len()))
                } else {
                    Error::truncated(format!("it ends at byte {} inside the index", self.len))
                },
            );
        }
        if self.current < self.entries.len() || self.buf.len() < TRAILER_LEN {
            return Err(Error::truncated(format!(
                "it ends at byte {} before the signature trailer",
                self.len
            )));
        }
        let publisher = verify_trailer(&self.digest, &self.buf)?;
        if let Some(part) = self.mismatch {
            return Err(Error::DigestMismatch { part });
        }
        let mut has_component = false;
        let mut files = BTreeMap::new();
        for entry in &self.entries {
            if entry.name == MANIFEST_ENTRY {
            } else if entry.name == COMPONENT_ENTRY {
                has_component = true;
            } else if let Some(file) = entry.name.strip_prefix(MODELS_PREFIX) {
                files.insert(file, ());
            } else {
                return Err(Error::UnexpectedPart {
                    name: entry.name.clone(),
                });
            }
        }
        if !self.entries.iter().any(|e| e.name == MANIFEST_ENTRY) {
            return Err(Error::MissingPart {
                name: MANIFEST_ENTRY.to_string(),
            });
        }
        let manifest_text = std::str::from_utf8(&self.manifest)
            .map_err(|_| Error::Manifest(format!("{MANIFEST_ENTRY} is not UTF-8: repack it")))?;
        let manifest = Manifest::from_toml(manifest_text)?;
        if !has_component {
            return Err(Error::MissingPart {
                name: COMPONENT_ENTRY.to_string(),
            });
        }
        check_files(&manifest, files)?;
        let files = self
            .entries
            .iter()
            .filter_map(|e| {
                let file = e.name.strip_prefix(MODELS_PREFIX)?;
                Some((file.to_string(), e.size))
            })
            .collect();
        Ok(StreamedBundle {
            manifest,
            digest: self.digest,
            publisher,
            len: self.len,
            files,
        })
    }
}

#[cfg(test)]
mod tests;
