//! Certificate pinning: the master agent makes a self-signed certificate at
//! each boot and announces its sha256 on the serial console; the dispatcher
//! accepts exactly that certificate and nothing else. No certificate
//! authority, name or date is involved: the console is the root of trust.

pub use ferry_proto::pin::{provider, PinnedCert};

/// The server name the dispatcher asks for (the agent's certificate names
/// it; only the fingerprint decides).
pub const SERVER_NAME: &str = "ferry-master-agent";

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A self-signed certificate and its key, as the master agent makes them.
    fn identity() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let made = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).expect("cert");
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).expect("key");
        (made.cert.der().clone(), key)
    }

    /// Serves one TLS connection presenting `cert` on loopback; returns its
    /// address. The server echoes one byte.
    async fn server(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> std::net::SocketAddr {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let mut b = [0u8; 1];
                if tls.read_exact(&mut b).await.is_ok() {
                    let _ = tls.write_all(&b).await;
                    let _ = tls.flush().await;
                }
            }
        });
        addr
    }

    /// Connects pinned to `pin`; echoes one byte through when accepted.
    async fn client(addr: std::net::SocketAddr, pin: &Arc<PinnedCert>) -> std::io::Result<u8> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(pin.clone())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from(SERVER_NAME).expect("name");
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"x").await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await?;
        Ok(b[0])
    }

    #[tokio::test]
    async fn only_the_pinned_certificate_is_accepted() {
        let (cert, key) = identity();
        let announced = ferry_proto::sha256_hex(cert.as_ref());

        let addr = server(cert.clone(), key.clone_key()).await;
        let pin = PinnedCert::new(&announced.to_ascii_uppercase());
        assert_eq!(client(addr, &pin).await.expect("pinned"), b'x');
        assert_eq!(pin.refused(), None);

        // Another certificate (a fresh one with the same name, as an
        // impostor on the lab network would make) is refused.
        let (other, other_key) = identity();
        let addr = server(other.clone(), other_key).await;
        let pin = PinnedCert::new(&announced);
        let e = client(addr, &pin).await.expect_err("impostor");
        assert!(e.to_string().contains("certificate"), "{e}");
        assert_eq!(pin.refused(), Some(ferry_proto::sha256_hex(other.as_ref())));
    }
}
