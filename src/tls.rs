//! The one TLS client configuration: system roots plus `extra_ca_file`, verified always.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Why the TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    ReadCa {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM certificate: {reason}")]
    BadCa { path: String, reason: String },
    #[error("no trusted root certificates: install the system CA bundle or set extra_ca_file")]
    NoRoots,
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the client config shared by the upstream pool and the token client.
///
/// Reads files, so call it before serving, not on a request path.
pub fn client_config(extra_ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping a system certificate");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, "system root certificates loaded");
    if let Some(path) = extra_ca_file {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
            path: shown.clone(),
            source,
        })?;
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| TlsError::BadCa {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| TlsError::BadCa {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(TlsError::BadCa {
                path: shown,
                reason: "no CERTIFICATE block found".to_owned(),
            });
        }
    }
    if roots.is_empty() {
        // Plain-http loopback setups (tests, the demo) still work; https will fail per request.
        tracing::warn!("{}", TlsError::NoRoots);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
