//! The agent's TLS identity: a key pair and self-signed certificate made at
//! each boot. Nothing is stored on the board; the certificate's fingerprint
//! goes into the console announcement, and the dispatcher accepts exactly
//! that certificate, so no certificate authority is involved.

use tonic::transport::{Identity, ServerTlsConfig};

/// The name in the certificate. Dispatchers pin the certificate itself, not
/// a name, so this is only informative.
pub const SERVER_NAME: &str = "ferry-master-agent";

/// Why a TLS identity could not be made.
#[derive(Debug, thiserror::Error)]
#[error("making this boot's TLS certificate: {0}")]
pub struct TlsError(#[from] rcgen::Error);

/// This boot's certificate and key.
pub struct TlsIdentity {
    cert_pem: String,
    key_pem: String,
    /// sha256 (lowercase hex) of the certificate's DER encoding.
    pub fingerprint: String,
}

impl TlsIdentity {
    /// A fresh key pair and a self-signed certificate for it.
    ///
    /// # Errors
    /// When the key or certificate cannot be made.
    pub fn generate() -> Result<Self, TlsError> {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
        Ok(TlsIdentity {
            fingerprint: ferry_proto::sha256_hex(made.cert.der()),
            cert_pem: made.cert.pem(),
            key_pem: made.signing_key.serialize_pem(),
        })
    }

    /// The server configuration serving this identity; a client that has not
    /// finished its handshake within `handshake` is dropped.
    pub fn server_config(&self, handshake: std::time::Duration) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(handshake)
    }
}

/// Makes ring the process's TLS crypto provider (idempotent). The only one
/// compiled in; installing it explicitly keeps rustls from guessing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_identity_is_new() {
        let a = TlsIdentity::generate().expect("a");
        let b = TlsIdentity::generate().expect("b");
        assert!(ferry_proto::is_sha256(&a.fingerprint));
        assert_ne!(a.fingerprint, b.fingerprint);
        assert_ne!(a.key_pem, b.key_pem);
        assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
