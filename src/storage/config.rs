//! Options shared by every backend, and the S3 credential/endpoint resolution order.
//!
//! Resolution is a pure function of the options, an environment lookup and the s3cmd config file,
//! so the order can be unit-tested without touching the process environment.
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::tls::{s3_trust, Trust};
use crate::error::{Error, Result};

/// Settings for opening remote sources and sinks. `Default` means: no explicit credentials
/// (the lookup order below applies), default endpoints, default tuning.
///
/// S3 credentials, first match wins per field: the explicit `s3_*` fields, then the environment
/// (`S3_ACCESS_KEY_ID`, `S3_SECRET_ACCESS_KEY`), then the s3cmd config (`s3_config_path` or
/// `~/.s3cfg`, section `[default]`), then the standard AWS chain (`AWS_*` variables, profiles, web
/// identity, ECS/IMDS), then anonymous access. `""` for both keys asks for anonymous access.
///
/// S3 endpoint: `s3_endpoint`, then `S3_ENDPOINT_URL`, then the s3cfg `host_base`, then
/// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` / the profile's `endpoint_url`, else AWS.
#[derive(Clone, Default)]
pub struct StorageOptions {
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    pub s3_session_token: Option<String>,
    /// `host[:port]` or a URL; without a scheme `https://` is used (`http://` with `force_http`).
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    /// An s3cmd config file to use instead of `~/.s3cfg`.
    pub s3_config_path: Option<PathBuf>,
    /// Use `http://` for an endpoint given without a scheme. `None` lets the s3cfg `use_https`
    /// decide. Endpoints given as `http://…` are accepted either way.
    pub force_http: Option<bool>,
    /// Extra headers sent with every HTTP(S) request (e.g. `Authorization`). Not used for S3.
    pub http_headers: Vec<(String, String)>,
    /// Most ranged requests in flight per source (default 32).
    pub max_concurrency: Option<usize>,
    /// Bytes per ranged GET (default 8 MiB); a larger `read_at` is split into requests this big.
    pub request_size: Option<usize>,
    /// Retries per request after the first attempt (default 5), with exponential backoff.
    pub max_retries: Option<u32>,
    /// Size of the S3 multipart parts (default 8 MiB, at least 5 MiB). Part 1, kept in memory until
    /// `finish`, is this big too; later parts double in size every 1000 parts.
    pub s3_part_size: Option<usize>,
    /// Upper bound on the bytes an S3 sink buffers for parts being filled or uploaded (default
    /// 256 MiB; a write only waits for memory while some upload is in flight).
    pub s3_upload_buffer: Option<usize>,
    /// Certificate authorities to trust for `https://` and S3 endpoints: a PEM file or a directory
    /// of PEM files, used instead of the system roots. `None`: `REQUESTS_CA_BUNDLE` /
    /// `CURL_CA_BUNDLE` (HTTPS) or `AWS_CA_BUNDLE` (S3), else the system roots (which
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR` replace). See `storage::tls`.
    pub ca_bundle: Option<PathBuf>,
    /// Skip certificate verification for `https://` and S3 endpoints (curl's `--insecure`).
    pub allow_untrusted: bool,
    /// Read `http(s)://` bodies from the socket straight into the load's buffers where that
    /// is safe (`storage::http_direct`; default on); `Some(false)` sends every request through
    /// reqwest (the load options set it from `TENSORIZER_RS_HTTP_DIRECT=0`).
    pub http_direct: Option<bool>,
    /// A read request that receives nothing for this long is dropped and sent again (default
    /// 60 s; the load options set it from `TENSORIZER_RS_STALL_TIMEOUT`).
    pub stall_timeout: Option<Duration>,
    /// A read request that receives nothing for this long while the source's other requests
    /// keep receiving data is sent again on another connection (default 3 s; zero turns this
    /// off; the load options set it from `TENSORIZER_RS_HEDGE_AFTER`).
    pub hedge_after: Option<Duration>,
    /// Write local files through an unnamed temporary (`O_TMPFILE`) where the file system
    /// allows (default on); `Some(false)`: a named, locked temporary (the load options set it
    /// from `TENSORIZER_RS_O_TMPFILE=0`).
    pub local_tmpfile: Option<bool>,
}

/// Defaults, in one place.
pub(crate) const DEFAULT_MAX_CONCURRENCY: usize = 32;
pub(crate) const DEFAULT_REQUEST_SIZE: usize = 8 << 20;
pub(crate) const DEFAULT_MAX_RETRIES: u32 = 5;
pub(crate) const DEFAULT_PART_SIZE: usize = 8 << 20;
pub(crate) const MIN_PART_SIZE: usize = 5 << 20;
pub(crate) const DEFAULT_UPLOAD_BUFFER: usize = 256 << 20;
pub(crate) const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_HEDGE_AFTER: Duration = Duration::from_secs(3);

impl StorageOptions {
    pub(crate) fn max_concurrency(&self) -> usize {
        self.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY).max(1)
    }
    pub(crate) fn request_size(&self) -> usize {
        self.request_size.unwrap_or(DEFAULT_REQUEST_SIZE).max(4096)
    }
    pub(crate) fn stall_timeout(&self) -> Duration {
        self.stall_timeout.unwrap_or(DEFAULT_STALL_TIMEOUT).max(Duration::from_millis(100))
    }
    /// `None`: no hedging.
    pub(crate) fn hedge_after(&self) -> Option<Duration> {
        let d = self.hedge_after.unwrap_or(DEFAULT_HEDGE_AFTER);
        (!d.is_zero()).then_some(d)
    }
    pub(crate) fn retry_policy(&self) -> super::retry::RetryPolicy {
        super::retry::RetryPolicy {
            max_retries: self.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// Shows which settings are present, never their secret values.
impl fmt::Debug for StorageOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        let header_names: Vec<&str> = self.http_headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("StorageOptions")
            .field("s3_access_key_id", &secret(&self.s3_access_key_id))
            .field("s3_secret_access_key", &secret(&self.s3_secret_access_key))
            .field("s3_session_token", &secret(&self.s3_session_token))
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("s3_config_path", &self.s3_config_path)
            .field("force_http", &self.force_http)
            .field("http_headers", &header_names)
            .field("max_concurrency", &self.max_concurrency)
            .field("request_size", &self.request_size)
            .field("max_retries", &self.max_retries)
            .field("s3_part_size", &self.s3_part_size)
            .field("s3_upload_buffer", &self.s3_upload_buffer)
            .field("ca_bundle", &self.ca_bundle)
            .field("allow_untrusted", &self.allow_untrusted)
            .field("http_direct", &self.http_direct)
            .field("stall_timeout", &self.stall_timeout)
            .field("hedge_after", &self.hedge_after)
            .field("local_tmpfile", &self.local_tmpfile)
            .finish()
    }
}

/// Where S3 credentials come from, once resolved.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum S3Credentials {
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    /// Unsigned requests (public buckets).
    Anonymous,
    /// Let the AWS default chain find credentials; fall back to anonymous if it finds none.
    AwsChain,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            S3Credentials::Static { .. } => "Static(<redacted>)",
            S3Credentials::Anonymous => "Anonymous",
            S3Credentials::AwsChain => "AwsChain",
        })
    }
}

/// The S3 settings `open_source`/`create_sink` act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Settings {
    pub credentials: S3Credentials,
    /// A full URL (with scheme), or `None` for the AWS chain's endpoint (profile or AWS itself).
    pub endpoint: Option<String>,
    /// `None`: the AWS chain's region (environment, profile), else `us-east-1`.
    pub region: Option<String>,
    /// The certificate authorities the connection trusts.
    pub trust: Trust,
}

/// The `[default]` section of an s3cmd config file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct S3Cfg {
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    pub host_base: Option<String>,
    pub use_https: Option<bool>,
}

/// Parse the INI text of an s3cmd config; only the `[default]` section matters.
pub(crate) fn parse_s3cfg(text: &str) -> S3Cfg {
    let mut section = String::new();
    let mut values: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if section != "default" {
            continue;
        }
        if let Some((k, v)) = line.split_once('=').or_else(|| line.split_once(':')) {
            values.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let non_empty = |k: &str| values.get(k).filter(|v| !v.is_empty()).cloned();
    S3Cfg {
        // s3cmd writes unset keys as `access_key = `; those leave the credential unset.
        access_key: non_empty("access_key"),
        secret_key: non_empty("secret_key"),
        host_base: non_empty("host_base"),
        use_https: values
            .get("use_https")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "yes" | "1" | "on")),
    }
}

fn read_s3cfg(path: &Path, explicit: bool) -> Result<Option<S3Cfg>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(parse_s3cfg(&text))),
        // A missing ~/.s3cfg is normal; a missing file the caller named is an error.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(None),
        Err(e) => Err(Error::from(e).in_file(&path.to_string_lossy())),
    }
}

fn with_scheme(endpoint: &str, force_http: bool) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else if force_http {
        format!("http://{endpoint}")
    } else {
        format!("https://{endpoint}")
    }
}

/// Resolve credentials, endpoint and region. `env` looks up an environment variable; `home` is
/// the user's home directory (for `~/.s3cfg`).
pub(crate) fn resolve_s3(
    opts: &StorageOptions,
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&Path>,
) -> Result<S3Settings> {
    let env_nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
    let mut key_id = opts.s3_access_key_id.clone();
    let mut secret = opts.s3_secret_access_key.clone();
    let mut force_http = opts.force_http;
    let mut endpoint = opts.s3_endpoint.clone().filter(|e| !e.is_empty());

    // Explicit `""` for both keys: anonymous, and nothing else is consulted for credentials.
    let anonymous = key_id.as_deref() == Some("") && secret.as_deref() == Some("");

    if !anonymous {
        if key_id.is_none() {
            key_id = env_nonempty("S3_ACCESS_KEY_ID");
        }
        if secret.is_none() {
            secret = env_nonempty("S3_SECRET_ACCESS_KEY");
        }
    }
    if endpoint.is_none() {
        endpoint = env_nonempty("S3_ENDPOINT_URL");
    }

    // The s3cmd config is read only when the keys are still incomplete (as in tensorizer: with
    // both keys given, its host_base is not used either).
    if !anonymous && (key_id.is_none() || secret.is_none()) {
        let (path, explicit) = match &opts.s3_config_path {
            Some(p) => (Some(p.clone()), true),
            None => (home.map(|h| h.join(".s3cfg")), false),
        };
        if let Some(path) = path {
            if let Some(cfg) = read_s3cfg(&path, explicit)? {
                key_id = key_id.or(cfg.access_key);
                secret = secret.or(cfg.secret_key);
                endpoint = endpoint.or(cfg.host_base);
                if force_http.is_none() {
                    force_http = cfg.use_https.map(|https| !https);
                }
            }
        }
    }

    let credentials = if anonymous {
        S3Credentials::Anonymous
    } else {
        match (key_id, secret) {
            (Some(k), Some(s)) => S3Credentials::Static {
                access_key_id: k,
                secret_access_key: s,
                session_token: opts.s3_session_token.clone().filter(|t| !t.is_empty()),
            },
            (None, None) => S3Credentials::AwsChain,
            (Some(_), None) => return Err(Error::value("an S3 access key id was given without a secret access key")),
            (None, Some(_)) => return Err(Error::value("an S3 secret access key was given without an access key id")),
        }
    };

    if endpoint.is_none() && !env("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS").is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        endpoint = env_nonempty("AWS_ENDPOINT_URL_S3").or_else(|| env_nonempty("AWS_ENDPOINT_URL"));
    }
    let endpoint = endpoint.map(|e| with_scheme(e.trim_end_matches('/'), force_http.unwrap_or(false)));
    let region = opts.s3_region.clone().filter(|r| !r.is_empty());
    let trust = s3_trust(opts, env)?;
    Ok(S3Settings { credentials, endpoint, region, trust })
}

/// Hosts that need virtual-hosted-style addressing (as in tensorizer); every other custom endpoint
/// gets path-style, which S3-compatible servers expect.
pub(crate) fn wants_path_style(endpoint: &str) -> bool {
    let host = endpoint.split("://").nth(1).unwrap_or(endpoint);
    let host = host.split(['/', ':']).next().unwrap_or(host);
    !matches!(host.to_ascii_lowercase().as_str(), "cwobject.com" | "cwlota.com")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    fn static_creds(k: &str, s: &str) -> S3Credentials {
        S3Credentials::Static { access_key_id: k.into(), secret_access_key: s.into(), session_token: None }
    }

    fn home_with_s3cfg(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".s3cfg"), text).unwrap();
        dir
    }

    const S3CFG: &str = "[default]\naccess_key = cfgkey\nsecret_key = cfgsecret\nhost_base = object.example.com\nuse_https = False\n\n[other]\naccess_key = nope\n";

    #[test]
    fn parses_s3cfg_default_section() {
        let cfg = parse_s3cfg(S3CFG);
        assert_eq!(cfg.access_key.as_deref(), Some("cfgkey"));
        assert_eq!(cfg.secret_key.as_deref(), Some("cfgsecret"));
        assert_eq!(cfg.host_base.as_deref(), Some("object.example.com"));
        assert_eq!(cfg.use_https, Some(false));
        assert_eq!(parse_s3cfg("[default]\naccess_key =\n").access_key, None);
    }

    #[test]
    fn explicit_beats_env_beats_s3cfg_beats_chain() {
        let home = home_with_s3cfg(S3CFG);
        let env = env_of(&[("S3_ACCESS_KEY_ID", "envkey"), ("S3_SECRET_ACCESS_KEY", "envsecret")]);
        let explicit = StorageOptions {
            s3_access_key_id: Some("k".into()),
            s3_secret_access_key: Some("s".into()),
            s3_session_token: Some("t".into()),
            ..Default::default()
        };
        let r = resolve_s3(&explicit, &env, Some(home.path())).unwrap();
        assert_eq!(
            r.credentials,
            S3Credentials::Static {
                access_key_id: "k".into(),
                secret_access_key: "s".into(),
                session_token: Some("t".into())
            }
        );
        // Both keys explicit: the s3cfg (and its host_base) is not read.
        assert_eq!(r.endpoint, None);

        let r = resolve_s3(&StorageOptions::default(), &env, Some(home.path())).unwrap();
        assert_eq!(r.credentials, static_creds("envkey", "envsecret"));

        let r = resolve_s3(&StorageOptions::default(), &env_of(&[]), Some(home.path())).unwrap();
        assert_eq!(r.credentials, static_creds("cfgkey", "cfgsecret"));
        assert_eq!(r.endpoint.as_deref(), Some("http://object.example.com"), "use_https = False means http");

        let empty = tempfile::tempdir().unwrap();
        let r = resolve_s3(&StorageOptions::default(), &env_of(&[]), Some(empty.path())).unwrap();
        assert_eq!(r.credentials, S3Credentials::AwsChain);
        assert_eq!(r.endpoint, None);
    }

    #[test]
    fn s3cfg_fills_only_missing_fields() {
        let home = home_with_s3cfg(S3CFG);
        let opts = StorageOptions { s3_access_key_id: Some("mine".into()), ..Default::default() };
        let r = resolve_s3(&opts, &env_of(&[]), Some(home.path())).unwrap();
        assert_eq!(r.credentials, static_creds("mine", "cfgsecret"));
        let opts = StorageOptions {
            force_http: Some(false),
            s3_endpoint: Some("e.example:9000".into()),
            ..Default::default()
        };
        let r = resolve_s3(&opts, &env_of(&[]), Some(home.path())).unwrap();
        assert_eq!(r.endpoint.as_deref(), Some("https://e.example:9000"));
    }

    #[test]
    fn explicit_config_path_must_exist() {
        let opts = StorageOptions { s3_config_path: Some("/nonexistent/s3cfg".into()), ..Default::default() };
        assert!(resolve_s3(&opts, &env_of(&[]), None).is_err());
    }

    #[test]
    fn empty_keys_mean_anonymous() {
        let home = home_with_s3cfg(S3CFG);
        let opts = StorageOptions {
            s3_access_key_id: Some(String::new()),
            s3_secret_access_key: Some(String::new()),
            ..Default::default()
        };
        let r = resolve_s3(&opts, &env_of(&[("S3_ACCESS_KEY_ID", "x")]), Some(home.path())).unwrap();
        assert_eq!(r.credentials, S3Credentials::Anonymous);
    }

    #[test]
    fn half_a_key_pair_is_an_error() {
        let opts = StorageOptions { s3_secret_access_key: Some("s".into()), ..Default::default() };
        let err = resolve_s3(&opts, &env_of(&[]), None).unwrap_err();
        assert_eq!(err.kind, crate::error::ErrorKind::Value);
    }

    #[test]
    fn endpoint_order() {
        let env = env_of(&[
            ("S3_ENDPOINT_URL", "http://s3env:1"),
            ("AWS_ENDPOINT_URL_S3", "http://awss3:2"),
            ("AWS_ENDPOINT_URL", "http://aws:3"),
        ]);
        let opts = StorageOptions { s3_endpoint: Some("explicit:9000".into()), ..Default::default() };
        assert_eq!(resolve_s3(&opts, &env, None).unwrap().endpoint.as_deref(), Some("https://explicit:9000"));
        let forced = StorageOptions { force_http: Some(true), ..opts };
        assert_eq!(resolve_s3(&forced, &env, None).unwrap().endpoint.as_deref(), Some("http://explicit:9000"));
        let d = StorageOptions::default();
        assert_eq!(resolve_s3(&d, &env, None).unwrap().endpoint.as_deref(), Some("http://s3env:1"));
        let env = env_of(&[("AWS_ENDPOINT_URL_S3", "http://awss3:2"), ("AWS_ENDPOINT_URL", "http://aws:3")]);
        assert_eq!(resolve_s3(&d, &env, None).unwrap().endpoint.as_deref(), Some("http://awss3:2"));
        let env = env_of(&[("AWS_ENDPOINT_URL", "http://aws:3/")]);
        assert_eq!(resolve_s3(&d, &env, None).unwrap().endpoint.as_deref(), Some("http://aws:3"));
        let env = env_of(&[("AWS_ENDPOINT_URL", "http://aws:3"), ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")]);
        assert_eq!(resolve_s3(&d, &env, None).unwrap().endpoint, None);
    }

    #[test]
    fn path_style_except_coreweave_virtual_hosts() {
        assert!(wants_path_style("http://127.0.0.1:9000"));
        assert!(wants_path_style("https://object.ord1.coreweave.com"));
        assert!(!wants_path_style("https://cwobject.com"));
        assert!(!wants_path_style("https://CWLOTA.com/"));
    }

    #[test]
    fn debug_hides_secrets() {
        let opts = StorageOptions {
            s3_access_key_id: Some("AKIAEXAMPLEKEYID".into()),
            s3_secret_access_key: Some("supersecretvalue".into()),
            s3_session_token: Some("sessiontokenvalue".into()),
            http_headers: vec![("Authorization".into(), "Bearer hunter2".into())],
            ..Default::default()
        };
        let shown = format!("{opts:?}");
        for secret in ["AKIAEXAMPLEKEYID", "supersecretvalue", "sessiontokenvalue", "hunter2"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("Authorization"));
        let r = resolve_s3(&opts, &env_of(&[]), None).unwrap();
        assert!(!format!("{r:?}").contains("supersecretvalue"));
    }
}
