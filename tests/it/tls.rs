//! TLS termination with a self-signed certificate made here.

use std::sync::Arc;

use crate::common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};

struct Certs {
    _dir: tempfile::TempDir,
    cert_path: String,
    key_path: String,
    cert_pem: String,
}

fn self_signed() -> Certs {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    Certs {
        cert_pem: cert.pem(),
        cert_path: cert_path.display().to_string(),
        key_path: key_path.display().to_string(),
        _dir: dir,
    }
}

/// A handshake restricted to one TLS version, then GET /healthz over it.
async fn handshake(
    port: u16,
    certs: &Certs,
    version: &'static rustls::SupportedProtocolVersion,
) -> (u16, rustls::ProtocolVersion) {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile_free(&certs.cert_pem) {
        roots.add(cert).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("handshake succeeds");
    let negotiated = tls.get_ref().1.protocol_version().unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/healthz").header("host", "localhost").body(Empty::<bytes::Bytes>::new()).unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let _ = res.into_body().collect().await;
    (status, negotiated)
}

fn rustls_pemfile_free(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).map(Result::unwrap).collect()
}

#[tokio::test]
async fn serves_tls_1_2_and_1_3_and_refuses_plain_http() {
    let certs = self_signed();
    let gw = TestGateway::start_with(
        Backend::Embedded,
        "tls",
        &[("KOOGATE_TLS_CERT", &certs.cert_path), ("KOOGATE_TLS_KEY", &certs.key_path)],
    )
    .await;
    let port = gw.running().addr.port();

    assert_eq!(handshake(port, &certs, &rustls::version::TLS12).await, (200, rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(handshake(port, &certs, &rustls::version::TLS13).await, (200, rustls::ProtocolVersion::TLSv1_3));

    // A signed call over HTTPS, verifying the certificate.
    let https =
        koogate::tools::client::KooClient::with_ca(&format!("https://127.0.0.1:{port}"), certs.cert_pem.as_bytes())
            .unwrap();
    let res = https.v2("/koogallery/v2", AK, &fixture("v2/01-newInstance.json"), now_ms()).await.unwrap();
    assert_eq!(res.result_code().as_deref(), Some("000000"));
    assert!(independent_body_sign_ok(AK, &res.body, res.body_sign.as_deref()));

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = koogate::tools::client::KooClient::new(&format!("http://127.0.0.1:{port}"));
    let refused = plain.send(hyper::Method::GET, "/healthz", &[], bytes::Bytes::new()).await;
    assert!(refused.is_err(), "plain HTTP must not be served on the TLS port: {refused:?}");
    gw.stop().await;
}

#[test]
fn a_missing_key_or_bad_certificate_stops_start_up_with_the_variable_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_koogate"))
        .env_clear()
        .env("KOOGATE_ACCESS_KEY", "k")
        .env("KOOGATE_TLS_CERT", "/nonexistent/cert.pem")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KOOGATE_TLS_KEY: is required when KOOGATE_TLS_CERT is set"));
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_koogate"))
        .env_clear()
        .env("KOOGATE_ACCESS_KEY", "k")
        .env("KOOGATE_STORE", dir.path())
        .env("KOOGATE_LISTEN", "127.0.0.1:0")
        .env("KOOGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("KOOGATE_TLS_CERT", "/nonexistent/cert.pem")
        .env("KOOGATE_TLS_KEY", "/nonexistent/key.pem")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("KOOGATE_TLS_CERT: cannot read certificates from /nonexistent/cert.pem"));
}
