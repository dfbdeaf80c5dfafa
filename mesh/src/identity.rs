//! The cluster CA and member identities.
//!
//! A member makes its own key and a CSR ([`new_csr`]); the CA ([`Ca::issue`]) signs the CSR's
//! public key into a certificate whose subject CN is the member's [`Principal`] and whose only
//! SAN is [`SERVER_NAME`](crate::SERVER_NAME), whatever the CSR asked for.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::error::{Error, Result, cert_err};

/// Who a certificate speaks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Principal {
    /// A coordinator, by its Raft id.
    Coordinator(u64),
    /// A mesh node, by its node id.
    Node(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Coordinator(id) => write!(f, "coordinator/{id}"),
            Principal::Node(id) => write!(f, "node/{id}"),
        }
    }
}

impl FromStr for Principal {
    type Err = Error;

    fn from_str(s: &str) -> Result<Principal> {
        let bad = || {
            cert_err(format!(
                "{s:?} names no principal (coordinator/N or node/ID)"
            ))
        };
        let principal = match s.split_once('/') {
            Some(("coordinator", id)) => Principal::Coordinator(id.parse().map_err(|_| bad())?),
            Some(("node", id)) if !id.is_empty() => Principal::Node(id.to_string()),
            _ => return Err(bad()),
        };
        // One spelling per principal: "coordinator/+3" or "coordinator/03" is not "coordinator/3".
        if principal.to_string() != s {
            return Err(bad());
        }
        Ok(principal)
    }
}

/// The cluster's certificate authority: its certificate and key, as PEM.
#[derive(Clone)]
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    fingerprint: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn days(n: i64) -> time::Duration {
    time::Duration::days(n)
}

impl Ca {
    /// A new self-signed CA (ECDSA P-256), valid for ten years.
    pub fn generate(cluster_name: &str) -> Result<Ca> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("sophon cluster CA {cluster_name}"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - days(1);
        params.not_after = now + days(3650);
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Ca {
            fingerprint: hex::encode(Sha256::digest(cert.der())),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA from its PEM certificate and key, checked to be a CA and to belong together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem).map_err(cert_err)?;
        let der = first_cert(cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(cert_err)?;
        if !cert.is_ca() {
            return Err(cert_err("the CA certificate is not marked as a CA"));
        }
        let cert_key = cert.public_key().subject_public_key.data.as_ref();
        if cert_key != key.public_key_raw() {
            return Err(cert_err("the CA key does not match the CA certificate"));
        }
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            fingerprint: hex::encode(Sha256::digest(der.as_ref())),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Lowercase hex SHA-256 of the CA certificate (DER): what a join token pins.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// Signs the public key of `csr_pem` into a certificate for `principal`, valid for a year.
    pub fn issue(&self, csr_pem: &str, principal: &Principal) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err)?;
        let key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &key).map_err(cert_err)?;
        let mut params = member_params(principal)?;
        params.serial_number = Some(serial(csr.public_key.der_bytes(), principal));
        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(cert_err)?;
        Ok(cert.pem())
    }

    /// A key and certificate for `principal`, both made here (the first member at bootstrap).
    pub fn issue_identity(&self, principal: &Principal) -> Result<Identity> {
        let (key_pem, csr_pem) = new_csr()?;
        let cert_pem = self.issue(&csr_pem, principal)?;
        Ok(Identity {
            principal: principal.clone(),
            cert_pem,
            key_pem,
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A serial number unique to this key, principal and moment (rcgen's default is the key's hash
/// alone, which repeats when a key is certified twice).
fn serial(public_key: &[u8], principal: &Principal) -> SerialNumber {
    let now = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let mut hash = Sha256::new();
    hash.update(public_key);
    hash.update(principal.to_string().as_bytes());
    hash.update(now.to_be_bytes());
    let mut bytes = hash.finalize()[..16].to_vec();
    bytes[0] &= 0x7f; // positive, as RFC 5280 asks
    SerialNumber::from(bytes)
}

fn member_params(principal: &Principal) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, principal.to_string());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(
        crate::SERVER_NAME.try_into().map_err(cert_err)?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - days(1);
    params.not_after = now + days(365);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A new key (ECDSA P-256) and a CSR for it: (key PEM, CSR PEM).
pub fn new_csr() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(cert_err)?;
    let params = CertificateParams::default();
    let csr = params.serialize_request(&key).map_err(cert_err)?;
    Ok((key.serialize_pem(), csr.pem().map_err(cert_err)?))
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| cert_err("no certificate in the PEM text"))?
        .map_err(cert_err)
}

/// Lowercase hex SHA-256 of the first certificate in `cert_pem` (DER).
pub fn fingerprint_of_pem(cert_pem: &str) -> Result<String> {
    Ok(hex::encode(Sha256::digest(first_cert(cert_pem)?.as_ref())))
}

/// The principal a certificate's subject CN names.
pub(crate) fn principal_of(der: &[u8]) -> Option<Principal> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    cn.parse().ok()
}

/// A certificate's serial number as lowercase hex (its DER bytes, leading zero included):
/// what a revocation list and the replicated membership record.
pub(crate) fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

/// The serial number of the first certificate in `cert_pem`, as lowercase hex.
pub fn serial_of_pem(cert_pem: &str) -> Result<String> {
    serial_of(first_cert(cert_pem)?.as_ref())
        .ok_or_else(|| cert_err("the certificate cannot be parsed"))
}

/// The principal the first certificate in `cert_pem` names.
pub fn principal_of_pem(cert_pem: &str) -> Result<Principal> {
    principal_of(first_cert(cert_pem)?.as_ref())
        .ok_or_else(|| cert_err("the certificate names no principal"))
}

/// A member's certificate, key and the CA certificate it trusts.
#[derive(Clone)]
pub struct Identity {
    pub principal: Principal,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

fn write_atomic(path: &Path, text: &str, private: bool) -> Result<()> {
    use std::io::Write as _;
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let tmp = path.with_extension("tmp");
    // A leftover from a crash would keep its old mode: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Identity {
    /// Writes `cert.pem`, `key.pem` (owner-only) and `ca.pem` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        write_atomic(&dir.join("cert.pem"), &self.cert_pem, false)?;
        write_atomic(&dir.join("key.pem"), &self.key_pem, true)?;
        write_atomic(&dir.join("ca.pem"), &self.ca_pem, false)?;
        // The renames are durable once the directory is.
        #[cfg(unix)]
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::Io {
                path: dir.display().to_string(),
                source: e,
            })?;
        Ok(())
    }

    /// Checks that the certificate names this identity's principal, certifies this identity's
    /// key, and was signed by the CA in `ca_pem` (what a joiner checks of the certificate it
    /// was sent before it keeps it).
    pub fn check(&self) -> Result<()> {
        let der = first_cert(&self.cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(cert_err)?;
        if principal_of(der.as_ref()).as_ref() != Some(&self.principal) {
            return Err(cert_err(format!(
                "the certificate does not name {}",
                self.principal
            )));
        }
        let key = KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(cert_err("the certificate is not for this identity's key"));
        }
        let ca_der = first_cert(&self.ca_pem)?;
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der.as_ref()).map_err(cert_err)?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|e| cert_err(format!("the CA did not sign the certificate: {e}")))
    }

    /// Reads an identity [`Identity::save`] wrote; the principal comes from the certificate.
    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| Error::Io {
                path: path.display().to_string(),
                source: e,
            })
        };
        let cert_pem = read("cert.pem")?;
        let principal = principal_of(first_cert(&cert_pem)?.as_ref())
            .ok_or_else(|| cert_err("the certificate names no principal"))?;
        Ok(Identity {
            principal,
            cert_pem,
            key_pem: read("key.pem")?,
            ca_pem: read("ca.pem")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    #[test]
    fn principals_print_and_parse_one_way() -> anyhow::Result<()> {
        for p in [Principal::Coordinator(3), Principal::Node("gpu-7".into())] {
            assert_eq!(p.to_string().parse::<Principal>()?, p);
        }
        assert_eq!(Principal::Coordinator(3).to_string(), "coordinator/3");
        for bad in [
            "coordinator/x",
            "coordinator/+3",
            "coordinator/03",
            "node/",
            "ca/1",
            "x",
        ] {
            assert!(bad.parse::<Principal>().is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn issue_ignores_what_the_csr_asks_for() -> anyhow::Result<()> {
        let ca = Ca::generate("test")?;
        let key = KeyPair::generate()?;
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()])?;
        asked
            .distinguished_name
            .push(DnType::CommonName, "coordinator/0");
        let csr = asked.serialize_request(&key)?.pem()?;
        let pem = ca.issue(&csr, &Principal::Node("n1".into()))?;
        let der = first_cert(&pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())?;
        assert_eq!(
            principal_of(der.as_ref()),
            Some(Principal::Node("n1".into()))
        );
        let san = cert
            .subject_alternative_name()?
            .map(|s| s.value.general_names.clone());
        assert_eq!(san, Some(vec![GeneralName::DNSName(crate::SERVER_NAME)]));
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage()?.map(|e| e.value.clone());
        assert!(eku.is_some_and(|e| e.server_auth && e.client_auth));
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(ca.issue("not a csr", &Principal::Coordinator(1)).is_err());
        Ok(())
    }

    #[test]
    fn ca_and_identity_round_trip_through_pem_and_files() -> anyhow::Result<()> {
        let ca = Ca::generate("test")?;
        assert_eq!(ca.fingerprint(), fingerprint_of_pem(ca.cert_pem())?);
        assert_eq!(ca.fingerprint().len(), 64);
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem())?;
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let other = Ca::generate("other")?;
        assert!(Ca::from_pem(ca.cert_pem(), other.key_pem()).is_err());

        let (key_pem, csr_pem) = new_csr()?;
        let cert_pem = ca.issue(&csr_pem, &Principal::Coordinator(9))?;
        let id = Identity {
            principal: Principal::Coordinator(9),
            cert_pem,
            key_pem,
            ca_pem: ca.cert_pem().to_string(),
        };
        let member = ca.issue_identity(&Principal::Coordinator(4))?;
        assert!(
            Ca::from_pem(&member.cert_pem, &member.key_pem).is_err(),
            "a leaf is no CA"
        );

        id.check()?;
        member.check()?;
        let wrong_principal = Identity {
            principal: Principal::Coordinator(8),
            ..id.clone()
        };
        assert!(wrong_principal.check().is_err());
        let wrong_key = Identity {
            key_pem: member.key_pem.clone(),
            ..id.clone()
        };
        assert!(wrong_key.check().is_err());
        let wrong_ca = Identity {
            ca_pem: other.cert_pem().to_string(),
            ..id.clone()
        };
        assert!(wrong_ca.check().is_err(), "signed by another CA");
        assert_eq!(principal_of_pem(&id.cert_pem)?, Principal::Coordinator(9));

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("identity");
        id.save(&path)?;
        id.save(&path)?; // overwriting is fine
        let back = Identity::load(&path)?;
        assert_eq!(back.principal, id.principal);
        assert_eq!(
            (&back.cert_pem, &back.key_pem, &back.ca_pem),
            (&id.cert_pem, &id.key_pem, &id.ca_pem)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path.join("key.pem"))?
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        Ok(())
    }
}
