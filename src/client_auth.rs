//! Client authentication material beyond a static secret: a secret read from a
//! helper command, a private key that signs `private_key_jwt` assertions
//! (RFC 7523 §2.2), and a client certificate for `tls_client_auth` (RFC 8705 §2).
//!
//! Keys are read once, when the config is loaded, kept in zeroized buffers and never
//! printed; what changes at run time (a rotated secret) lives in a [`SecretCell`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// How long a client assertion is valid (RFC 7523 asks for a short `exp`).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// Longest secret a command may print; more is refused rather than buffered.
const MAX_COMMAND_OUTPUT: usize = 64 * 1024;

/// The client secret in force. Shared by every clone of the provider's settings, so
/// a secret re-read after `invalid_client` is what the next token request sends.
#[derive(Clone)]
pub struct SecretCell(Arc<ArcSwap<Secret>>);

impl Default for SecretCell {
    fn default() -> Self {
        Self::new(Secret::new(""))
    }
}

impl SecretCell {
    /// A cell holding `secret`.
    pub fn new(secret: Secret) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(secret)))
    }

    /// The secret in force now.
    pub fn current(&self) -> Arc<Secret> {
        self.0.load_full()
    }

    /// Replaces the secret; returns true when it differs from the old one.
    pub fn set(&self, secret: Secret) -> bool {
        let new = Arc::new(secret);
        let old = self.0.swap(new.clone());
        *old != *new
    }
}

impl fmt::Debug for SecretCell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl PartialEq for SecretCell {
    fn eq(&self, other: &Self) -> bool {
        *self.current() == *other.current()
    }
}

/// `client_secret_command`: a program and its arguments, run without a shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretCommand {
    pub argv: Vec<String>,
    /// The config key, for messages (`providers.NAME.client_secret_command`).
    pub key: String,
}

/// Why a secret command gave no secret. Never holds what the command printed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommandError {
    #[error("{key}: cannot run `{program}`: {reason}")]
    Spawn {
        key: String,
        program: String,
        reason: String,
    },
    #[error("{key}: `{program}` did not finish within {timeout:?}")]
    Timeout {
        key: String,
        program: String,
        timeout: Duration,
    },
    #[error("{key}: `{program}` failed ({status}); its output is not shown because it may hold the secret")]
    Failed {
        key: String,
        program: String,
        status: String,
    },
    #[error("{key}: `{program}` printed no secret")]
    Empty { key: String, program: String },
    #[error("{key}: `{program}` printed more than 64 KiB or text that is not UTF-8")]
    Unusable { key: String, program: String },
}

impl SecretCommand {
    fn program(&self) -> String {
        self.argv.first().cloned().unwrap_or_default()
    }

    /// Runs the command (off the runtime's worker threads: tokio waits for the child
    /// on its own), bounded by `timeout`; stdout without its trailing newline.
    pub async fn run(&self, timeout: Duration) -> Result<Secret, CommandError> {
        let program = self.program();
        let key = self.key.clone();
        let mut command = tokio::process::Command::new(&program);
        command
            .args(self.argv.iter().skip(1))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            // Its error text may quote the secret: discarded, never logged.
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn().map_err(|e| CommandError::Spawn {
            key: key.clone(),
            program: program.clone(),
            reason: e.to_string(),
        })?;
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => {
                return Err(CommandError::Spawn {
                    key,
                    program,
                    reason: e.to_string(),
                })
            }
            // Dropping the future drops the child, which kills it (kill_on_drop).
            Err(_) => {
                return Err(CommandError::Timeout {
                    key,
                    program,
                    timeout,
                })
            }
        };
        let stdout = Zeroizing::new(output.stdout);
        if !output.status.success() {
            return Err(CommandError::Failed {
                key,
                program,
                status: output.status.to_string(),
            });
        }
        if stdout.len() > MAX_COMMAND_OUTPUT {
            return Err(CommandError::Unusable { key, program });
        }
        let Ok(text) = std::str::from_utf8(&stdout) else {
            return Err(CommandError::Unusable { key, program });
        };
        let secret = text.trim_end_matches(['\r', '\n']);
        if secret.is_empty() {
            return Err(CommandError::Empty { key, program });
        }
        Ok(Secret::new(secret))
    }
}

/// A private key file, read once: its bytes (zeroized on drop) and their digest.
#[derive(Clone)]
struct KeyFile {
    path: PathBuf,
    pem: Arc<Zeroizing<Vec<u8>>>,
    digest: [u8; 32],
}

impl KeyFile {
    fn new(path: &Path, pem: Zeroizing<Vec<u8>>) -> Self {
        let digest = Sha256::digest(pem.as_slice()).into();
        Self {
            path: path.to_owned(),
            pem: Arc::new(pem),
            digest,
        }
    }
}

/// The key that signs client assertions (`private_key_jwt`).
#[derive(Clone)]
pub struct AssertionKey {
    file: KeyFile,
    signing: Arc<EncodingKey>,
    pub alg: Algorithm,
    pub key_id: Option<String>,
    /// The `aud` claim.
    pub audience: String,
}

/// The kind of key a PEM file holds, for the default algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
}

impl AssertionKey {
    /// Parses a PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC) and checks that it can
    /// sign with `alg` (default: RS256 for RSA, ES256 for P-256, ES384 for P-384).
    /// The error is a sentence for the config key; it never quotes the key.
    pub fn load(
        path: &Path,
        pem: Zeroizing<Vec<u8>>,
        alg: Option<Algorithm>,
        key_id: Option<String>,
        audience: String,
    ) -> Result<Self, String> {
        let (kind, signing) = signing_key(&pem)?;
        let alg = match alg {
            Some(alg) => alg,
            None => match kind {
                KeyKind::Rsa => Algorithm::RS256,
                KeyKind::EcP256 => Algorithm::ES256,
                KeyKind::EcP384 => Algorithm::ES384,
            },
        };
        let fits = match kind {
            KeyKind::Rsa => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            KeyKind::EcP256 => alg == Algorithm::ES256,
            KeyKind::EcP384 => alg == Algorithm::ES384,
        };
        if !fits {
            return Err(format!(
                "client_assertion_alg {alg:?} does not fit the {kind:?} key in {}",
                path.display()
            ));
        }
        let key = Self {
            file: KeyFile::new(path, pem),
            signing: Arc::new(signing),
            alg,
            key_id,
            audience,
        };
        // Sign once now so a key the backend refuses fails `check`, not the first fetch.
        key.assertion("check")
            .map_err(|e| format!("{} cannot sign {alg:?}: {e}", path.display()))?;
        Ok(key)
    }

    /// A fresh client assertion for `client_id`: `iss` = `sub` = client_id, the
    /// configured `aud`, a random `jti`, `iat` now and `exp` a minute later.
    pub fn assertion(&self, client_id: &str) -> Result<Secret, jsonwebtoken::errors::Error> {
        let iat = crate::unix_time::secs(SystemTime::now());
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": self.audience,
            "jti": format!("{:032x}", rand::random::<u128>()),
            "iat": iat,
            "exp": iat + ASSERTION_LIFETIME.as_secs(),
        });
        let mut header = Header::new(self.alg);
        header.kid.clone_from(&self.key_id);
        jsonwebtoken::encode(&header, &claims, &self.signing).map(Secret::new)
    }

    /// The key file's bytes, for deriving the fleet's encryption key.
    pub fn material(&self) -> &[u8] {
        &self.file.pem
    }

    /// A digest of the key file, for the token cache fingerprint.
    pub fn digest(&self) -> [u8; 32] {
        self.file.digest
    }
}

/// Detects the key's kind and builds the signing key through the JOSE library (and
/// its crypto backend for traditional EC keys, which the library reads only as PKCS#8).
fn signing_key(pem: &[u8]) -> Result<(KeyKind, EncodingKey), String> {
    let der = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|_| "holds no PEM private key (PKCS#8, RSA or EC)".to_owned())?;
    let is_rsa = match &der {
        PrivateKeyDer::Pkcs1(_) => true,
        PrivateKeyDer::Sec1(_) => false,
        // PKCS#8 names its algorithm: try EC first, then RSA.
        _ => ec_pkcs8(der.secret_der()).is_none(),
    };
    if is_rsa {
        let key = EncodingKey::from_rsa_pem(pem)
            .map_err(|_| "holds a private key that is neither RSA nor EC P-256/P-384".to_owned())?;
        return Ok((KeyKind::Rsa, key));
    }
    let (kind, pkcs8) = ec_pkcs8(der.secret_der())
        .ok_or_else(|| "holds an EC key on a curve other than P-256 or P-384".to_owned())?;
    Ok((kind, EncodingKey::from_ec_der(&pkcs8)))
}

/// An EC key (SEC1 or PKCS#8) re-encoded as PKCS#8, with its curve.
fn ec_pkcs8(der: &[u8]) -> Option<(KeyKind, Zeroizing<Vec<u8>>)> {
    use aws_lc_rs::signature::{
        EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    [
        (KeyKind::EcP256, &ECDSA_P256_SHA256_FIXED_SIGNING),
        (KeyKind::EcP384, &ECDSA_P384_SHA384_FIXED_SIGNING),
    ]
    .into_iter()
    .find_map(|(kind, alg)| {
        let pair = EcdsaKeyPair::from_private_key_der(alg, der).ok()?;
        let doc = pair.to_pkcs8v1().ok()?;
        Some((kind, Zeroizing::new(doc.as_ref().to_vec())))
    })
}

impl fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionKey")
            .field("file", &self.file.path)
            .field("alg", &self.alg)
            .field("key_id", &self.key_id)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl PartialEq for AssertionKey {
    fn eq(&self, other: &Self) -> bool {
        self.file.digest == other.file.digest
            && self.alg == other.alg
            && self.key_id == other.key_id
            && self.audience == other.audience
    }
}

/// The client certificate and key for `tls_client_auth`.
#[derive(Clone)]
pub struct ClientIdentity {
    key: KeyFile,
    cert_path: PathBuf,
    cert_digest: [u8; 32],
    certified: Arc<rustls::sign::CertifiedKey>,
}

impl ClientIdentity {
    /// Parses the certificate chain and key and checks that they belong together.
    pub fn load(
        cert_path: &Path,
        cert_pem: &[u8],
        key_path: &Path,
        key_pem: Zeroizing<Vec<u8>>,
    ) -> Result<Self, (&'static str, String)> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| ("client_cert_file", format!("{}: {e}", cert_path.display())))?;
        if chain.is_empty() {
            return Err((
                "client_cert_file",
                format!("{} holds no PEM certificate", cert_path.display()),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
            (
                "client_key_file",
                format!(
                    "{} holds no PEM private key (PKCS#8, RSA or EC)",
                    key_path.display()
                ),
            )
        })?;
        let provider = rustls::crypto::ring::default_provider();
        let certified =
            rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                (
                    "client_key_file",
                    format!(
                        "{} does not fit {}: {e}",
                        key_path.display(),
                        cert_path.display()
                    ),
                )
            })?;
        Ok(Self {
            key: KeyFile::new(key_path, key_pem),
            cert_path: cert_path.to_owned(),
            cert_digest: Sha256::digest(cert_pem).into(),
            certified: Arc::new(certified),
        })
    }

    /// The TLS settings `base` (same roots) presenting this certificate.
    pub fn client_config(&self, base: &rustls::ClientConfig) -> rustls::ClientConfig {
        let mut config = base.clone();
        config.client_auth_cert_resolver = Arc::new(FixedClientCert(self.certified.clone()));
        config
    }

    /// The key file's bytes, for deriving the fleet's encryption key.
    pub fn material(&self) -> &[u8] {
        &self.key.pem
    }

    /// A digest of certificate and key, for the token cache fingerprint and for
    /// telling identities apart.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cert_digest);
        h.update(self.key.digest);
        h.finalize().into()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert", &self.cert_path)
            .field("key", &self.key.path)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.digest() == other.digest()
    }
}

/// Presents the one configured certificate whatever the server asks for: a server
/// that does not trust it refuses the handshake and says so.
#[derive(Debug)]
struct FixedClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Parses a `client_assertion_alg` value.
pub fn parse_alg(value: &str) -> Result<Algorithm, String> {
    let alg = match value {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        other => {
            return Err(format!(
                "`{other}` is not one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384"
            ))
        }
    };
    Ok(alg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(key: &rcgen::KeyPair) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(key.serialize_pem().into_bytes())
    }

    fn claims(jwt: &str) -> (serde_json::Value, serde_json::Value) {
        use base64::Engine;
        let part = |i: usize| -> serde_json::Value {
            let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(jwt.split('.').nth(i).unwrap())
                .unwrap();
            serde_json::from_slice(&b).unwrap()
        };
        (part(0), part(1))
    }

    #[test]
    fn alg_from_key_and_claims() {
        for (alg, expected) in [
            (&rcgen::PKCS_RSA_SHA256, "RS256"),
            (&rcgen::PKCS_ECDSA_P256_SHA256, "ES256"),
            (&rcgen::PKCS_ECDSA_P384_SHA384, "ES384"),
        ] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let key = AssertionKey::load(
                Path::new("k.pem"),
                pem(&kp),
                None,
                Some("kid-1".into()),
                "https://issuer/token".into(),
            )
            .unwrap();
            let jwt = key.assertion("client-a").unwrap();
            let (header, body) = claims(jwt.expose());
            assert_eq!(header["alg"], expected);
            assert_eq!(header["kid"], "kid-1");
            assert_eq!(body["iss"], "client-a");
            assert_eq!(body["sub"], "client-a");
            assert_eq!(body["aud"], "https://issuer/token");
            assert_eq!(
                body["exp"].as_u64().unwrap() - body["iat"].as_u64().unwrap(),
                60
            );
            let again = key.assertion("client-a").unwrap();
            assert_ne!(claims(again.expose()).1["jti"], body["jti"]);
        }
    }

    #[test]
    fn wrong_alg_or_garbage_is_refused() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let e = AssertionKey::load(
            Path::new("k.pem"),
            pem(&kp),
            Some(Algorithm::RS256),
            None,
            "a".into(),
        )
        .unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
        let e = AssertionKey::load(
            Path::new("k.pem"),
            Zeroizing::new(b"not a key".to_vec()),
            None,
            None,
            "a".into(),
        )
        .unwrap_err();
        assert!(e.contains("no PEM private key"), "{e}");
    }

    #[test]
    fn secret_cell_reports_change() {
        let cell = SecretCell::new(Secret::new("a"));
        let copy = cell.clone();
        assert!(!cell.set(Secret::new("a")));
        assert!(cell.set(Secret::new("b")));
        assert_eq!(copy.current().expose(), "b");
        assert_eq!(format!("{cell:?}"), "***");
    }
}
