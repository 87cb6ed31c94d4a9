//! The S3 client's HTTP connector when certificate verification is off (`allow_untrusted`,
//! CoreWeave's `CAInfo(allow_untrusted=True)`): the AWS SDK's own TLS setup has no such switch, so
//! its requests go through reqwest with the rustls configuration `storage::tls` builds for
//! `Trust::Insecure` (the one HTTPS uses), instead.
use std::fmt;
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;

use super::ranged::error_chain;
use super::tls::{self, Trust};
use crate::error::{Error, Result};

/// An SDK HTTP client that sends every request through one reqwest client trusting any
/// certificate. Redirects are left to the SDK (S3 answers a wrong region with a 301).
pub(crate) fn http_client() -> Result<SharedHttpClient> {
    let tls = tls::client_config(&Trust::Insecure)?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .use_preconfigured_tls((*tls).clone())
        .build()
        .map_err(|e| Error::io(format!("cannot create the S3 HTTP client: {}", error_chain(&e))))?;
    Ok(SharedHttpClient::new(Insecure(client)))
}

#[derive(Clone)]
struct Insecure(reqwest::Client);

impl fmt::Debug for Insecure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("S3 HTTP client without certificate verification")
    }
}

impl HttpClient for Insecure {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

impl HttpConnector for Insecure {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.0.clone();
        HttpConnectorFuture::new(async move {
            let request = request.try_into_http1x().map_err(|e| ConnectorError::other(e.into(), None))?;
            let (parts, body) = request.into_parts();
            // The SDK requests we make (GET, PUT of an in-memory part, multipart XML) carry
            // their whole body in memory.
            let body = body.bytes().map(<[u8]>::to_vec).ok_or_else(|| {
                ConnectorError::other(
                    "streaming request bodies are not supported without certificate checks".into(),
                    None,
                )
            })?;
            let request = reqwest::Request::try_from(http::Request::from_parts(parts, body))
                .map_err(|e| ConnectorError::other(e.into(), None))?;
            let response = client.execute(request).await.map_err(|e| {
                if e.is_timeout() {
                    ConnectorError::timeout(e.into())
                } else if e.is_connect() || e.is_request() || e.is_body() {
                    ConnectorError::io(e.into())
                } else {
                    ConnectorError::other(e.into(), None)
                }
            })?;
            let response: http::Response<reqwest::Body> = response.into();
            let (parts, body) = response.into_parts();
            let response = http::Response::from_parts(parts, SdkBody::from_body_1_x(body));
            aws_smithy_runtime_api::http::Response::try_from(response)
                .map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}
