//! A TLS front for a plain-HTTP server on 127.0.0.1, for clients that talk nothing else.
//!
//! The Java KPL's native daemon always uses HTTPS to Kinesis (it sets a host and a port, never a
//! scheme), so it cannot reach the embedded Kinesis (plain HTTP) directly. [`TlsFront`] accepts
//! TLS 1.2/1.3 with a self-signed certificate made at start (for `localhost` and `127.0.0.1`;
//! clients must not verify it: the KPL's `VerifyCertificate=false`) and relays the decrypted
//! bytes, both ways, to the upstream address. It offers no ALPN, so clients speak HTTP/1.1.

use crate::error::{Error, Result};
use crate::server::ServerThread;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A TLS listener on 127.0.0.1 relaying to a plain TCP server; stops when dropped.
#[derive(Debug)]
pub struct TlsFront {
    server: ServerThread,
    upstream: SocketAddr,
}

impl TlsFront {
    /// Starts a front for `upstream_url` (`http://host:port`, as [`crate::Kinesis::endpoint_url`]
    /// gives it).
    ///
    /// # Errors
    /// When the URL is not `http://` with a socket address, or no certificate or port can be had.
    pub async fn start(upstream_url: &str) -> Result<Self> {
        let upstream: SocketAddr = upstream_url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .and_then(|addr| addr.parse().ok())
            .ok_or_else(|| {
                Error::msg(format!("tls front: the upstream must be http://<ip>:<port>, not {upstream_url}"))
            })?;
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(|e| Error::with_source("tls front: could not make a certificate", e))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(vec![certified.cert.der().clone()], key))
            .map_err(|e| Error::with_source("tls front: bad TLS configuration", e))?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let server = ServerThread::spawn("tls-front", 2, move |listener, stop| {
            Ok(async move {
                tokio::pin!(stop);
                loop {
                    let (tcp, _) = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok(pair) => pair,
                            Err(_) => continue,
                        },
                        _ = &mut stop => return Ok(()),
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                        let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else { return };
                        let _ = plain.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    });
                }
            })
        })
        .await?;
        Ok(Self { server, upstream })
    }

    /// `127.0.0.1:<port>`: what the KPL takes as `KinesisEndpoint` and `KinesisPort`.
    pub fn host_port(&self) -> String {
        self.server.url().trim_start_matches("http://").to_owned()
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.host_port())
    }

    /// The plain server this front relays to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }
}
