//! Which certificate authorities HTTPS and S3 connections trust, as Python users set them.
//!
//! The TLS itself is reqwest's and the AWS SDK's (rustls); this module only picks the roots:
//!
//! * an explicit `ca_bundle` (a PEM file, or a directory of PEM files, like curl's `--cacert` /
//!   `--capath` and CoreWeave's `CAInfo`): exactly its certificates are trusted;
//! * else, for `http(s)://`, `REQUESTS_CA_BUNDLE`, then `CURL_CA_BUNDLE` (requests' order), and
//!   for `s3://`, `AWS_CA_BUNDLE` (botocore's): the same, from that file or directory;
//! * else the system roots (rustls-native-certs, which honours `SSL_CERT_FILE` and
//!   `SSL_CERT_DIR` in place of the system store, as OpenSSL does).
//!
//! A bundle replaces the system roots, as in requests, curl and botocore; to add a private CA,
//! use a bundle holding the system's roots too. `allow_untrusted` (curl's `--insecure`) turns
//! verification off, for `http(s)://` and `s3://` (whose client then sends its requests through
//! reqwest: `storage::s3_insecure`).
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::StorageOptions;
use crate::error::{Error, Result};

/// The roots one client trusts (also its cache key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Trust {
    /// The system store (or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    System,
    /// Exactly the certificates of a PEM file or of the PEM files in a directory.
    Bundle(PathBuf),
    /// No certificate verification at all.
    Insecure,
}

fn env_path(env: &dyn Fn(&str) -> Option<String>, names: &[&str]) -> Option<PathBuf> {
    names.iter().find_map(|k| env(k).filter(|v| !v.is_empty())).map(PathBuf::from)
}

/// Roots for `http(s)://`: `ca_bundle`, `allow_untrusted`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`.
pub(crate) fn http_trust(opts: &StorageOptions, env: &dyn Fn(&str) -> Option<String>) -> Trust {
    if let Some(p) = &opts.ca_bundle {
        Trust::Bundle(p.clone())
    } else if opts.allow_untrusted {
        Trust::Insecure
    } else {
        env_path(env, &["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"]).map_or(Trust::System, Trust::Bundle)
    }
}

/// Roots for `s3://`: `ca_bundle`, `allow_untrusted`, then `AWS_CA_BUNDLE`.
pub(crate) fn s3_trust(opts: &StorageOptions, env: &dyn Fn(&str) -> Option<String>) -> Result<Trust> {
    if let Some(p) = &opts.ca_bundle {
        Ok(Trust::Bundle(p.clone()))
    } else if opts.allow_untrusted {
        Ok(Trust::Insecure)
    } else {
        Ok(env_path(env, &["AWS_CA_BUNDLE"]).map_or(Trust::System, Trust::Bundle))
    }
}

/// An I/O error on the CA bundle, named as such (the kind is kept: missing is NotFound).
fn bundle_io(e: std::io::Error, path: &Path) -> Error {
    let err = Error::from(e);
    Error::new(err.kind, format!("CA bundle {}: {}", path.display(), err.message))
}

/// The certificates of one PEM file, each checked to be a usable trust anchor.
fn file_certificates(path: &Path) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>)> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|e| bundle_io(e, path))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::value(format!("CA bundle {shown}: not a valid PEM file ({e})")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots
            .add(cert.clone())
            .map_err(|e| Error::value(format!("CA bundle {shown}: a certificate cannot be used as a root ({e})")))?;
    }
    Ok((pem, certs))
}

/// The certificates of a bundle, one entry per PEM file read: the file itself, or each file of a
/// directory holding certificates (other files there are skipped, as OpenSSL's `capath` does).
/// A bundle without any certificate is an error: it would make every connection fail.
pub(crate) fn load_bundle(path: &Path) -> Result<Vec<(Vec<u8>, Vec<CertificateDer<'static>>)>> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| bundle_io(e, path))?;
    let mut out = Vec::new();
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| bundle_io(e, path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for p in entries {
            if let Ok((pem, certs)) = file_certificates(&p) {
                if !certs.is_empty() {
                    out.push((pem, certs));
                }
            }
        }
    } else {
        let (pem, certs) = file_certificates(path)?;
        if !certs.is_empty() {
            out.push((pem, certs));
        }
    }
    if out.is_empty() {
        return Err(Error::value(format!("CA bundle {shown} holds no PEM certificate")));
    }
    Ok(out)
}

/// The rustls client configuration for `trust`, one per set of roots for the whole process:
/// reqwest's client is built on it and the direct HTTPS path (`http_direct`) uses it as is.
/// HTTP/1.1 only (no ALPN), ring as the crypto provider.
pub(crate) fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>> {
    static CONFIGS: OnceLock<Mutex<HashMap<Trust, Arc<rustls::ClientConfig>>>> = OnceLock::new();
    let cache = CONFIGS.get_or_init(Default::default);
    if let Some(c) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(trust) {
        return Ok(c.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::io(format!("TLS setup: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    let config = match trust {
        Trust::System => {
            // What reqwest's native roots do: unparsable system certificates are skipped.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Bundle(path) => {
            for (_, certs) in load_bundle(path)? {
                for cert in certs {
                    roots.add(cert).map_err(|e| Error::value(format!("CA bundle {}: {e}", path.display())))?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny(provider))).with_no_client_auth()
        }
    };
    let config = Arc::new(config);
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(trust.clone(), config.clone());
    Ok(config)
}

/// `allow_untrusted` (curl's `--insecure`): any certificate is accepted; handshake signatures
/// are still checked against the certificate presented.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls error behind `err`, looking inside `io::Error`s (nested ones too: hyper-rustls wraps
/// tokio-rustls's `io::Error` in another, and `io::Error::source` skips the payload).
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = err.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

/// A hint for connection errors caused by certificate verification (checked by type along the
/// error's source chain), else `None`.
pub(crate) fn certificate_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(
            tls @ (rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType),
        ) = rustls_error(err)
        {
            return Some(format!(
                "TLS certificate verification failed ({tls}); if the server uses a private CA, pass its \
                 certificate as a PEM bundle: ca_bundle / CAInfo(cacert=...), or REQUESTS_CA_BUNDLE, \
                 CURL_CA_BUNDLE (https://), AWS_CA_BUNDLE (s3://), SSL_CERT_FILE (both)"
            ));
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn http_order() {
        let env =
            env_of(&[("REQUESTS_CA_BUNDLE", "/r.pem"), ("CURL_CA_BUNDLE", "/c.pem"), ("AWS_CA_BUNDLE", "/a.pem")]);
        let d = StorageOptions::default();
        assert_eq!(http_trust(&d, &env), Trust::Bundle("/r.pem".into()));
        assert_eq!(http_trust(&d, &env_of(&[("CURL_CA_BUNDLE", "/c.pem")])), Trust::Bundle("/c.pem".into()));
        assert_eq!(http_trust(&d, &env_of(&[("REQUESTS_CA_BUNDLE", ""), ("AWS_CA_BUNDLE", "/a")])), Trust::System);
        let explicit = StorageOptions { ca_bundle: Some("/x.pem".into()), ..Default::default() };
        assert_eq!(http_trust(&explicit, &env), Trust::Bundle("/x.pem".into()));
        let insecure = StorageOptions { allow_untrusted: true, ..Default::default() };
        assert_eq!(http_trust(&insecure, &env), Trust::Insecure);
    }

    #[test]
    fn s3_order() {
        let env = env_of(&[("REQUESTS_CA_BUNDLE", "/r.pem"), ("AWS_CA_BUNDLE", "/a.pem")]);
        let d = StorageOptions::default();
        assert_eq!(s3_trust(&d, &env).unwrap(), Trust::Bundle("/a.pem".into()));
        assert_eq!(s3_trust(&d, &env_of(&[("REQUESTS_CA_BUNDLE", "/r.pem")])).unwrap(), Trust::System);
        let explicit = StorageOptions { ca_bundle: Some("/x.pem".into()), ..Default::default() };
        assert_eq!(s3_trust(&explicit, &env).unwrap(), Trust::Bundle("/x.pem".into()));
        let insecure = StorageOptions { allow_untrusted: true, ..Default::default() };
        assert_eq!(s3_trust(&insecure, &env).unwrap(), Trust::Insecure);
    }

    #[test]
    fn certificate_errors_are_found_inside_nested_io_errors() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // hyper-rustls: io::Error::other(<tokio-rustls io::Error(InvalidData, rustls::Error)>)
        let nested = Outer(std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, tls)));
        let msg = certificate_error(&nested).unwrap();
        assert!(msg.contains("TLS certificate verification failed (invalid peer certificate: UnknownIssuer)"), "{msg}");
        let other = Outer(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert_eq!(certificate_error(&other), None);
    }

    #[test]
    fn bad_bundles_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load_bundle(&dir.path().join("nope.pem")).unwrap_err();
        assert_eq!(missing.kind, ErrorKind::NotFound);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").unwrap();
        assert!(load_bundle(&empty).unwrap_err().to_string().contains("holds no PEM certificate"));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert_eq!(load_bundle(&garbage).unwrap_err().kind, ErrorKind::Value);
        // A directory: files without usable certificates are skipped; none at all is an error.
        assert!(load_bundle(dir.path()).unwrap_err().to_string().contains("holds no PEM certificate"));
    }
}
