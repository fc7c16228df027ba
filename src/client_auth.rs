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
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
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

/// A JWS algorithm a client assertion can be signed with (RFC 7518 §3.3, §3.4, §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
}

impl Algorithm {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
        }
    }

    /// The RSA padding and digest, for the RSA algorithms.
    fn rsa_encoding(self) -> Option<&'static dyn ring::signature::RsaEncoding> {
        use ring::signature as s;
        Some(match self {
            Self::RS256 => &s::RSA_PKCS1_SHA256,
            Self::RS384 => &s::RSA_PKCS1_SHA384,
            Self::RS512 => &s::RSA_PKCS1_SHA512,
            Self::PS256 => &s::RSA_PSS_SHA256,
            Self::PS384 => &s::RSA_PSS_SHA384,
            Self::PS512 => &s::RSA_PSS_SHA512,
            Self::ES256 | Self::ES384 => return None,
        })
    }
}

/// Signing a client assertion failed (ring tells no more than that).
#[derive(Debug, thiserror::Error)]
#[error("the key could not sign")]
pub struct SignError;

/// A parsed private key, ready to sign.
enum SigningKey {
    Rsa(ring::rsa::KeyPair),
    /// ECDSA with the fixed-size `r || s` signature JWS wants (RFC 7518 §3.4).
    Ec(ring::signature::EcdsaKeyPair),
}

/// The key that signs client assertions (`private_key_jwt`).
#[derive(Clone)]
pub struct AssertionKey {
    file: KeyFile,
    signing: Arc<SigningKey>,
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

/// The JOSE header of a client assertion.
#[derive(serde::Serialize)]
struct JwsHeader<'a> {
    typ: &'static str,
    alg: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
}

/// The claims of a client assertion (RFC 7523 §3).
#[derive(serde::Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
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
            KeyKind::Rsa => alg.rsa_encoding().is_some(),
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
        // Sign once now so a key that cannot sign fails `check`, not the first fetch.
        key.assertion("check")
            .map_err(|e| format!("{} cannot sign {alg:?}: {e}", path.display()))?;
        Ok(key)
    }

    /// A fresh client assertion for `client_id`: `iss` = `sub` = client_id, the
    /// configured `aud`, a random `jti`, `iat` now and `exp` a minute later.
    pub fn assertion(&self, client_id: &str) -> Result<Secret, SignError> {
        let iat = crate::unix_time::secs(SystemTime::now());
        let header = JwsHeader {
            typ: "JWT",
            alg: self.alg.name(),
            kid: self.key_id.as_deref(),
        };
        let claims = AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: &self.audience,
            jti: format!("{:032x}", rand::random::<u128>()),
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let mut jws = String::with_capacity(1024);
        b64_json(&header, &mut jws);
        jws.push('.');
        b64_json(&claims, &mut jws);
        let signature = self.sign(jws.as_bytes())?;
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(&signature, &mut jws);
        Ok(Secret::new(jws))
    }

    /// The JWS signature over `input` (RFC 7515 §5.1).
    fn sign(&self, input: &[u8]) -> Result<Vec<u8>, SignError> {
        let rng = ring::rand::SystemRandom::new();
        match (&*self.signing, self.alg.rsa_encoding()) {
            (SigningKey::Rsa(key), Some(encoding)) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(encoding, &rng, input, &mut signature)
                    .map_err(|_| SignError)?;
                Ok(signature)
            }
            (SigningKey::Ec(key), None) => key
                .sign(&rng, input)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| SignError),
            // `load` pairs every key with an algorithm of its kind.
            _ => Err(SignError),
        }
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

/// Appends `value` as base64url JSON (a JWS header or payload).
fn b64_json(value: &impl serde::Serialize, out: &mut String) {
    // Serializing these plain structs to a Vec cannot fail.
    let json = serde_json::to_vec(value).unwrap_or_default();
    URL_SAFE_NO_PAD.encode_string(json, out);
}

/// Reads the key and tells its kind. RSA keys go to ring directly; EC keys are read by
/// the RustCrypto curve crates, which accept SEC1 as well as PKCS#8 and keys that leave
/// out the public key (ring needs it: they derive it).
fn signing_key(pem: &[u8]) -> Result<(KeyKind, SigningKey), String> {
    // Wiped when dropped, as the PEM it came from is.
    let der = Zeroizing::new(
        PrivateKeyDer::from_pem_slice(pem)
            .map_err(|_| "holds no PEM private key (PKCS#8, RSA or EC)".to_owned())?,
    );
    let rsa = match &*der {
        PrivateKeyDer::Pkcs1(k) => ring::rsa::KeyPair::from_der(k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => match pkcs8_algorithm(k.secret_pkcs8_der()) {
            Some(Pkcs8Algorithm::Rsa) => ring::rsa::KeyPair::from_pkcs8(k.secret_pkcs8_der()),
            Some(Pkcs8Algorithm::Ec) => return ec_signing_key(&der),
            None => return Err(NOT_RSA_OR_EC.to_owned()),
        },
        PrivateKeyDer::Sec1(_) => return ec_signing_key(&der),
        _ => return Err(NOT_RSA_OR_EC.to_owned()),
    };
    let key = rsa.map_err(|e| {
        // ring names a key of the wrong size `TooSmall` or `TooLarge`.
        let reason = e.to_string();
        if reason.starts_with("Too") {
            format!(
                "holds an RSA key that cannot sign ({reason}): RSA keys of 2048 to 4096 bits can"
            )
        } else {
            format!("holds an RSA key that cannot sign ({reason})")
        }
    })?;
    Ok((KeyKind::Rsa, SigningKey::Rsa(key)))
}

const NOT_RSA_OR_EC: &str = "holds a private key that is neither RSA nor EC P-256/P-384";

/// An ECDSA signing key from a SEC1 or PKCS#8 EC key.
fn ec_signing_key(der: &PrivateKeyDer<'_>) -> Result<(KeyKind, SigningKey), String> {
    let (kind, private, public) = ec_key(der)?;
    let alg = match kind {
        KeyKind::EcP384 => &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        _ => &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    };
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
        alg, &private, &public, &rng,
    )
    .map_err(|e| format!("holds an EC key that cannot sign ({e})"))?;
    Ok((kind, SigningKey::Ec(key)))
}

/// The key algorithms a PKCS#8 document may name that can sign assertions.
enum Pkcs8Algorithm {
    Rsa,
    Ec,
}

/// The kind of key a PKCS#8 document names: `rsaEncryption` (RFC 8017 Appendix C) or
/// `id-ecPublicKey` (RFC 5480 §2.1.1); `None` for anything else.
fn pkcs8_algorithm(der: &[u8]) -> Option<Pkcs8Algorithm> {
    use p256::pkcs8::{der::Decode, ObjectIdentifier, PrivateKeyInfoRef};
    const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    const EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
    let oid = PrivateKeyInfoRef::from_der(der).ok()?.algorithm.oid;
    match oid {
        RSA => Some(Pkcs8Algorithm::Rsa),
        EC => Some(Pkcs8Algorithm::Ec),
        _ => None,
    }
}

/// The curve, the private scalar and the uncompressed public point.
type EcKey = (KeyKind, Zeroizing<Vec<u8>>, Vec<u8>);

/// An EC key on one curve (`p256` or `p384`, the crate), read from SEC1 or PKCS#8.
macro_rules! ec_key_on {
    ($curve:ident, $kind:expr, $der:expr) => {{
        use $curve::elliptic_curve::sec1::ToSec1Point;
        use $curve::pkcs8::DecodePrivateKey;
        let key = match $der {
            PrivateKeyDer::Sec1(k) => {
                $curve::SecretKey::from_sec1_der(k.secret_sec1_der()).map_err(|e| e.to_string())
            }
            PrivateKeyDer::Pkcs8(k) => {
                $curve::SecretKey::from_pkcs8_der(k.secret_pkcs8_der()).map_err(|e| e.to_string())
            }
            _ => Err("not an EC key".to_owned()),
        };
        key.map(|key| {
            let public = key.public_key().as_affine().to_sec1_point(false);
            ($kind, scalar(key.to_bytes()), public.as_bytes().to_vec())
        })
    }};
}

/// An EC key (SEC1 or PKCS#8) as ring takes it: the curve, the private scalar and the
/// uncompressed public point (derived, so a key file without it is read too). The error
/// names what each curve's reader found wrong, since a damaged key and a key on another
/// curve both fail to read on both.
fn ec_key(der: &PrivateKeyDer<'_>) -> Result<EcKey, String> {
    let p256_error = match ec_key_on!(p256, KeyKind::EcP256, der) {
        Ok(key) => return Ok(key),
        Err(e) => e,
    };
    ec_key_on!(p384, KeyKind::EcP384, der).map_err(|p384_error| {
        format!(
            "holds an EC key that is not a usable P-256 or P-384 key (as P-256: {p256_error}; as P-384: {p384_error})"
        )
    })
}

/// The private scalar in a buffer wiped when dropped; the curve crate's copy it came in
/// is wiped here.
fn scalar(mut bytes: impl AsMut<[u8]>) -> Zeroizing<Vec<u8>> {
    let bytes = bytes.as_mut();
    let copy = Zeroizing::new(bytes.to_vec());
    zeroize::Zeroize::zeroize(bytes);
    copy
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

    /// DER tag-length-value, for lengths below 128 (enough for EC keys).
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let len = u8::try_from(content.len())
            .ok()
            .filter(|l| *l < 128)
            .unwrap();
        [&[tag, len][..], content].concat()
    }

    fn pem_of(label: &str, der: &[u8]) -> Zeroizing<Vec<u8>> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        Zeroizing::new(out.into_bytes())
    }

    /// The key inside a PKCS#8 document: PKCS#1 for RSA, SEC1 for EC.
    fn inner_key(kp: &rcgen::KeyPair) -> Vec<u8> {
        use p256::pkcs8::der::Decode;
        let der = kp.serialize_der();
        let info = p256::pkcs8::PrivateKeyInfoRef::from_der(&der).unwrap();
        info.private_key.as_bytes().to_vec()
    }

    /// An EC key as SEC1 and as PKCS#8, both without the optional public key
    /// (as some key tools write them).
    fn ec_without_public_key(kp: &rcgen::KeyPair, p384: bool) -> [Zeroizing<Vec<u8>>; 2] {
        use p256::pkcs8::DecodePrivateKey;
        let der = kp.serialize_der();
        let (scalar, curve): (Vec<u8>, &[u8]) = if p384 {
            let k = p384::SecretKey::from_pkcs8_der(&der).unwrap();
            (k.to_bytes().to_vec(), &[0x2b, 0x81, 0x04, 0x00, 0x22])
        } else {
            let k = p256::SecretKey::from_pkcs8_der(&der).unwrap();
            (
                k.to_bytes().to_vec(),
                &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            )
        };
        let curve_oid = tlv(0x06, curve);
        let ec_private_key = |with_curve: bool| {
            let mut body = tlv(0x02, &[1]);
            body.extend(tlv(0x04, &scalar));
            if with_curve {
                body.extend(tlv(0xa0, &curve_oid));
            }
            tlv(0x30, &body)
        };
        let sec1 = ec_private_key(true);
        let ec_public_key = tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
        let mut pkcs8 = tlv(0x02, &[0]);
        pkcs8.extend(tlv(0x30, &[ec_public_key, curve_oid.clone()].concat()));
        pkcs8.extend(tlv(0x04, &ec_private_key(false)));
        let pkcs8 = tlv(0x30, &pkcs8);
        [
            pem_of("EC PRIVATE KEY", &sec1),
            pem_of("PRIVATE KEY", &pkcs8),
        ]
    }

    /// Every algorithm with every key encoding the config accepts: the assertion
    /// verifies with a second JOSE implementation (jsonwebtoken on aws-lc) against the
    /// public key, and carries the header and claims the issuer checks.
    #[test]
    fn every_alg_and_key_encoding_signs_assertions_that_verify() {
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let rsa_files = [pem(&rsa), pem_of("RSA PRIVATE KEY", &inner_key(&rsa))];
        let ec_files = |kp: &rcgen::KeyPair, p384: bool| {
            let [sec1_bare, pkcs8_bare] = ec_without_public_key(kp, p384);
            [
                pem(kp),
                pem_of("EC PRIVATE KEY", &inner_key(kp)),
                sec1_bare,
                pkcs8_bare,
            ]
        };
        let cases = [
            (&rsa, &rsa_files[..], Algorithm::RS256),
            (&rsa, &rsa_files[..], Algorithm::RS384),
            (&rsa, &rsa_files[..], Algorithm::RS512),
            (&rsa, &rsa_files[..], Algorithm::PS256),
            (&rsa, &rsa_files[..], Algorithm::PS384),
            (&rsa, &rsa_files[..], Algorithm::PS512),
            (&p256, &ec_files(&p256, false)[..], Algorithm::ES256),
            (&p384, &ec_files(&p384, true)[..], Algorithm::ES384),
        ];
        for (kp, files, alg) in cases {
            for (i, file) in files.iter().enumerate() {
                let what = format!("{alg:?}, key file {i}");
                let explicit = AssertionKey::load(
                    Path::new("k.pem"),
                    file.clone(),
                    Some(alg),
                    Some("kid-7".into()),
                    "https://issuer/token".into(),
                )
                .unwrap_or_else(|e| panic!("{what}: {e}"));
                let jwt = explicit.assertion("client-b").unwrap();
                let decoding = if alg.rsa_encoding().is_some() {
                    jsonwebtoken::DecodingKey::from_rsa_der(kp.public_key_raw())
                } else {
                    jsonwebtoken::DecodingKey::from_ec_der(kp.public_key_raw())
                };
                let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
                assert_eq!(format!("{:?}", header.alg), alg.name(), "{what}");
                assert_eq!(header.kid.as_deref(), Some("kid-7"), "{what}");
                assert_eq!(header.typ.as_deref(), Some("JWT"), "{what}");
                let mut validation = jsonwebtoken::Validation::new(header.alg);
                validation.set_audience(&["https://issuer/token"]);
                validation.set_issuer(&["client-b"]);
                validation.sub = Some("client-b".into());
                validation.set_required_spec_claims(&["exp", "iat", "jti", "aud", "iss", "sub"]);
                let claims =
                    jsonwebtoken::decode::<serde_json::Value>(jwt.expose(), &decoding, &validation)
                        .unwrap_or_else(|e| panic!("{what}: {e}"))
                        .claims;
                assert_eq!(claims["jti"].as_str().map(str::len), Some(32), "{what}");
                // A signature from another key does not verify: the check above is real.
                let other = AssertionKey::load(
                    Path::new("o.pem"),
                    pem(&rcgen::KeyPair::generate_for(if alg == Algorithm::ES384 {
                        &rcgen::PKCS_ECDSA_P384_SHA384
                    } else if alg == Algorithm::ES256 {
                        &rcgen::PKCS_ECDSA_P256_SHA256
                    } else {
                        &rcgen::PKCS_RSA_SHA256
                    })
                    .unwrap()),
                    Some(alg),
                    None,
                    "https://issuer/token".into(),
                )
                .unwrap();
                let forged = other.assertion("client-b").unwrap();
                assert!(
                    jsonwebtoken::decode::<serde_json::Value>(
                        forged.expose(),
                        &decoding,
                        &validation
                    )
                    .is_err(),
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn keys_that_cannot_sign_are_refused_without_a_panic() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut sec1 = inner_key(&p256);
        // A private scalar of zero is no key.
        let at = sec1.windows(2).position(|w| w == [0x04, 0x20]).unwrap() + 2;
        sec1[at..at + 32].fill(0);
        let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let mut truncated = inner_key(&rsa);
        truncated.truncate(100);
        for (label, der) in [
            ("EC PRIVATE KEY", sec1),
            ("RSA PRIVATE KEY", truncated.clone()),
            ("PRIVATE KEY", truncated),
            ("PRIVATE KEY", vec![0x30, 0x00]),
        ] {
            let e = AssertionKey::load(
                Path::new("k.pem"),
                pem_of(label, &der),
                None,
                None,
                "a".into(),
            )
            .unwrap_err();
            assert!(e.contains("key"), "{label}: {e}");
            // Only a key of the wrong size is told which sizes can sign.
            assert!(!e.contains("2048 to 4096"), "{label}: {e}");
            if label == "EC PRIVATE KEY" {
                // A damaged P-256 key says what each curve's reader found, not "another curve".
                assert!(e.contains("as P-256:") && e.contains("as P-384:"), "{e}");
            }
        }
    }

    #[test]
    fn an_rsa_key_of_the_wrong_size_is_told_which_sizes_sign() {
        // 1,024 bits: too small for ring (no Rust key generator here makes RSA keys that
        // small, so openssl does; `.ci/run` installs it).
        let made = std::process::Command::new("openssl")
            .args(["genrsa", "1024"])
            .output()
            .expect("run openssl");
        assert!(made.status.success(), "openssl genrsa failed");
        let e = AssertionKey::load(
            Path::new("k.pem"),
            Zeroizing::new(made.stdout),
            None,
            None,
            "a".into(),
        )
        .unwrap_err();
        assert!(
            e.contains("TooSmall") && e.contains("2048 to 4096 bits"),
            "{e}"
        );
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
