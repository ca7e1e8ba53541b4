//! Certificate pinning, for both ends that dial a Ferry TLS listener: the
//! dispatcher dialing a master agent, and the test agent dialing the
//! dispatcher's record stream. The listener makes a self-signed certificate
//! and its sha256 reaches the dialer another way (the serial console, the
//! test plan); the dialer accepts exactly that certificate and nothing
//! else. No certificate authority, name or date is involved.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts only the certificate whose DER encoding has the pinned sha256.
/// Handshake signatures are still checked with the provider's algorithms,
/// so the peer must hold that certificate's private key.
#[derive(Debug)]
pub struct PinnedCert {
    fingerprint: String,
    algorithms: WebPkiSupportedAlgorithms,
    /// The fingerprint of a refused certificate, for the error message.
    refused: Mutex<Option<String>>,
}

impl PinnedCert {
    /// Pins `fingerprint` (sha256 hex of the certificate's DER encoding).
    pub fn new(fingerprint: &str) -> Arc<Self> {
        Arc::new(PinnedCert {
            fingerprint: fingerprint.to_ascii_lowercase(),
            algorithms: provider().signature_verification_algorithms,
            refused: Mutex::new(None),
        })
    }

    /// The fingerprint of the last certificate refused, if one was.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

/// The TLS crypto provider: ring, the only one compiled in.
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = crate::sha256_hex(end_entity.as_ref());
        if seen == self.fingerprint {
            return Ok(ServerCertVerified::assertion());
        }
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(seen);
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
