//! `podiam-sdk-client`: the Rust AWS SDK as a pod would use it, for the end-to-end tests.
//!
//! It fetches credentials with aws-config's instance-metadata credentials provider, unmodified
//! and with its default endpoint (http://169.254.169.254, IMDSv2 tokens), then calls STS
//! GetCallerIdentity with them and prints the caller's ARN, then on a second line how many
//! seconds the credentials have left. Run it inside a pod namespace.

use std::process::ExitCode;

use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_sdk_sts::config::ProvideCredentials;
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// STS endpoint to call GetCallerIdentity on (moto, through the pod's bridge).
    #[arg(long)]
    sts_endpoint: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    podiam_proto::tls::install_crypto_provider();
    let args = Args::parse();
    let provider = ImdsCredentialsProvider::builder().build();
    let credentials = match provider.provide_credentials().await {
        Ok(credentials) => credentials,
        Err(error) => {
            eprintln!(
                "no credentials from instance metadata: {}",
                aws_sdk_sts::error::DisplayErrorContext(&error)
            );
            return ExitCode::FAILURE;
        }
    };
    eprintln!("access key id: {}", credentials.access_key_id());
    let remaining = credentials
        .expiry()
        .and_then(|at| at.duration_since(std::time::SystemTime::now()).ok())
        .map_or(0, |d| d.as_secs());
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new(args.region))
        .endpoint_url(args.sts_endpoint)
        .credentials_provider(credentials)
        .build();
    match aws_sdk_sts::Client::from_conf(config)
        .get_caller_identity()
        .send()
        .await
    {
        Ok(identity) => {
            println!("{}", identity.arn().unwrap_or_default());
            println!("{remaining}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "GetCallerIdentity failed: {}",
                aws_sdk_sts::error::DisplayErrorContext(&error)
            );
            ExitCode::FAILURE
        }
    }
}
