//! S3 credentials and endpoint from the environment (the AWS chain, and S3_* ahead of it),
//! against moto with SigV4 on. One test in its own binary: it changes the process environment.
mod common;

use common::Moto;
use tensorizer_rs::storage::{read_all, write_all, StorageOptions};

#[test]
fn environment_credentials_and_endpoints() {
    let Some(moto) = Moto::start(true) else { return };
    moto.create_bucket("envb");
    let home = tempfile::tempdir().unwrap();
    // A clean slate: no ~/.s3cfg, no ~/.aws, no instance metadata probing.
    for k in ["S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_ENDPOINT_URL"] {
        std::env::remove_var(k);
    }
    std::env::set_var("HOME", home.path());
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_CONFIG_FILE", home.path().join("config"));
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", home.path().join("credentials"));

    // The standard AWS chain: AWS_* keys, AWS_ENDPOINT_URL_S3, AWS_REGION.
    std::env::set_var("AWS_ACCESS_KEY_ID", &moto.access_key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", &moto.secret_key);
    std::env::set_var("AWS_ENDPOINT_URL_S3", moto.endpoint());
    std::env::set_var("AWS_REGION", "us-east-1");
    let defaults = StorageOptions::default();
    write_all("s3://envb/chain", &defaults, b"from the AWS chain").unwrap();
    assert_eq!(read_all("s3://envb/chain", &defaults).unwrap(), b"from the AWS chain");

    // S3_* variables come before the AWS chain: wrong ones are used, and refused.
    std::env::set_var("S3_ACCESS_KEY_ID", &moto.access_key);
    std::env::set_var("S3_SECRET_ACCESS_KEY", "wrong-secret");
    let err = read_all("s3://envb/chain", &defaults).unwrap_err();
    assert!(err.to_string().contains("access denied"), "{err}");
    assert!(!err.to_string().contains("wrong-secret"), "{err}");

    // ... and explicit options come before both; S3_ENDPOINT_URL before AWS_ENDPOINT_URL_S3.
    std::env::set_var("S3_ENDPOINT_URL", moto.endpoint());
    std::env::set_var("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9");
    let explicit = StorageOptions {
        s3_access_key_id: Some(moto.access_key.clone()),
        s3_secret_access_key: Some(moto.secret_key.clone()),
        ..Default::default()
    };
    assert_eq!(read_all("s3://envb/chain", &explicit).unwrap(), b"from the AWS chain");
}
