//! `podiam-sdk-client`: the Rust AWS SDK as a pod would use it, for the end-to-end tests.
//!
//! Without a subcommand it fetches credentials once with aws-config's instance-metadata
//! credentials provider, unmodified and with its default endpoint (http://169.254.169.254,
//! IMDSv2 tokens) — or with `--provider container` its ECS (container) provider, unmodified,
//! configured by the environment as the SDK documents — then calls STS GetCallerIdentity
//! with them and prints the caller's ARN, then on a second line how many seconds the
//! credentials have left.
//!
//! `load` is an application that lives long: it builds ONE aws-config object when it starts
//! and fetches credentials with it in a loop until a stop file appears, printing one line per
//! fetch in the format of `podiam_tests::sdk_load` (`ok EPOCH ROLE MS` or
//! `fail EPOCH MS WHY`). `--api imds-client` holds one IMDS client (`aws_config::imds::Client`,
//! default token TTL of 6 hours, 4 attempts) and asks it for the role and then the role's
//! credentials; `--api provider` holds one `ImdsCredentialsProvider` and calls
//! `provide_credentials`. Both are built with their defaults; the one addition is a retry
//! classifier that delegates every decision to aws-config's own `ImdsResponseRetryClassifier`
//! and only notes each attempt's outcome, because the provider hides failures: when a fetch
//! fails it quietly returns the credentials it fetched last. A provider fetch is counted as
//! failed when its last HTTP attempt failed (its credentials document never came). A fetch
//! that succeeded only after a failed attempt (a retry, invisible but for its delay) is also
//! printed as `retry EPOCH WHY`. (aws-config runs the classifiers twice for an attempt that
//! got a response, once to decide on poisoning the connection: failures are listed as seen.)
//!
//! Run it inside a pod namespace.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::imds::client::ImdsResponseRetryClassifier;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_sdk_sts::config::interceptors::InterceptorContext;
use aws_sdk_sts::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_sts::config::{IntoShared, ProvideCredentials};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// STS endpoint to call GetCallerIdentity on (moto, through the pod's bridge); required
    /// without a subcommand.
    #[arg(long)]
    sts_endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Which credentials provider the one fetch uses.
    #[arg(long, value_enum, default_value = "imds")]
    provider: Provider,
}

/// aws-config's providers a pod may use, unmodified.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Provider {
    /// `ImdsCredentialsProvider` (169.254.169.254, IMDSv2 tokens).
    Imds,
    /// `EcsCredentialsProvider`: the container-credentials endpoint named by
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`, with the token of
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
    Container,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch credentials in a loop with one long-lived SDK object, one line per fetch.
    Load(LoadArgs),
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Which aws-config object the application holds.
    #[arg(long, value_enum)]
    api: Api,
    /// The loop ends when this file exists.
    #[arg(long)]
    stop_file: std::path::PathBuf,
    /// Roles a fetch may return (comma-separated; checked where the API names the role).
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Seconds the credentials must have left.
    #[arg(long)]
    min_left: u64,
    /// Pause between fetches, in seconds.
    #[arg(long)]
    pause: f64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Api {
    /// `aws_config::imds::Client`: the role, then its credentials.
    ImdsClient,
    /// `ImdsCredentialsProvider::provide_credentials`.
    Provider,
}

#[tokio::main]
async fn main() -> ExitCode {
    podiam_runtime::tls::install_crypto_provider();
    let args = Args::parse();
    match args.command {
        Some(Command::Load(load)) => run_load(load).await,
        None => match args.sts_endpoint {
            Some(endpoint) => once(endpoint, args.region, args.provider).await,
            None => {
                eprintln!("--sts-endpoint is required without a subcommand");
                ExitCode::from(2)
            }
        },
    }
}

/// One fetch with a fresh provider, then GetCallerIdentity with what it gave.
async fn once(sts_endpoint: String, region: String, provider: Provider) -> ExitCode {
    let fetched = match provider {
        Provider::Imds => {
            ImdsCredentialsProvider::builder()
                .build()
                .provide_credentials()
                .await
        }
        Provider::Container => {
            aws_config::ecs::EcsCredentialsProvider::builder()
                .build()
                .provide_credentials()
                .await
        }
    };
    let credentials = match fetched {
        Ok(credentials) => credentials,
        Err(error) => {
            eprintln!(
                "no credentials from {provider:?}: {}",
                aws_sdk_sts::error::DisplayErrorContext(&error)
            );
            return ExitCode::FAILURE;
        }
    };
    eprintln!("access key id: {}", credentials.access_key_id());
    let remaining = credentials
        .expiry()
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .map_or(0, |d| d.as_secs());
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new(region))
        .endpoint_url(sts_endpoint)
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

/// The outcome of one HTTP attempt, as the retry classifier saw it.
#[derive(Clone, Debug)]
enum Attempt {
    Succeeded,
    Failed(String),
}

/// aws-config's IMDS retry classifier, unchanged in what it decides, noting every attempt.
#[derive(Clone, Debug, Default)]
struct Observed {
    inner: ImdsResponseRetryClassifier,
    attempts: Arc<Mutex<Vec<Attempt>>>,
}

impl Observed {
    /// The attempts noted since the last call.
    fn take(&self) -> Vec<Attempt> {
        std::mem::take(&mut *self.attempts.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClassifyRetry for Observed {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let attempt = match (ctx.response(), ctx.is_failed()) {
            (_, false) => Attempt::Succeeded,
            (Some(response), true) => {
                Attempt::Failed(format!("HTTP {}", response.status().as_u16()))
            }
            (None, true) => Attempt::Failed(match ctx.output_or_error() {
                Some(Err(error)) => format!(
                    "no response: {}",
                    aws_sdk_sts::error::DisplayErrorContext(error)
                ),
                _ => "no response".to_string(),
            }),
        };
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(attempt);
        self.inner.classify_retry(ctx)
    }

    fn name(&self) -> &'static str {
        "ImdsResponseRetryClassifier (observed)"
    }
}

/// What one fetch yielded: the role (when the API names it) and the credentials' expiry.
struct Fetched {
    role: Option<String>,
    expiry: Option<SystemTime>,
    has_token: bool,
}

const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";

async fn run_load(args: LoadArgs) -> ExitCode {
    let observed = Observed::default();
    // Built once, held for the process's life, as applications hold them.
    let client = aws_config::imds::Client::builder()
        .retry_classifier(observed.clone().into_shared())
        .build();
    let provider = ImdsCredentialsProvider::builder()
        .imds_client(client.clone())
        .build();
    while !args.stop_file.exists() {
        let began = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let started = Instant::now();
        let result = match args.api {
            Api::ImdsClient => fetch_with_client(&client).await,
            Api::Provider => fetch_with_provider(&provider).await,
        };
        let took = started.elapsed().as_millis();
        let attempts = observed.take();
        let failed: Vec<&str> = attempts
            .iter()
            .filter_map(|a| match a {
                Attempt::Failed(why) => Some(why.as_str()),
                Attempt::Succeeded => None,
            })
            .collect();
        let last_succeeded = matches!(attempts.last(), Some(Attempt::Succeeded));
        let verdict = match result {
            Err(why) => Err(why),
            // The provider hid a failure behind its last credentials.
            Ok(_) if matches!(args.api, Api::Provider) && !last_succeeded => Err(format!(
                "the provider returned its last credentials; its attempts failed: {failed:?}"
            )),
            Ok(fetched) => check(&fetched, &args),
        };
        if verdict.is_ok()
            && let Some(first) = failed.first()
        {
            println!("retry {began:.3} {first}");
        }
        match verdict {
            Ok(role) => println!("ok {began:.3} {role} {took}"),
            Err(why) => println!("fail {began:.3} {took} {}", why.replace('\n', " ")),
        }
        tokio::time::sleep(Duration::from_secs_f64(args.pause)).await;
    }
    ExitCode::SUCCESS
}

/// The role, then its credentials document, with the one IMDS client.
async fn fetch_with_client(client: &aws_config::imds::Client) -> Result<Fetched, String> {
    let error = |e: aws_config::imds::client::error::ImdsError| {
        aws_sdk_sts::error::DisplayErrorContext(&e).to_string()
    };
    let role = client.get(CREDENTIALS_PATH).await.map_err(error)?;
    let role = role.as_ref().trim().to_string();
    let document = client
        .get(format!("{CREDENTIALS_PATH}{role}"))
        .await
        .map_err(error)?;
    let document: serde_json::Value = serde_json::from_str(document.as_ref())
        .map_err(|e| format!("credentials document: {e}"))?;
    if document["Code"] != "Success" {
        return Err(format!(
            "credentials document with Code {}",
            document["Code"]
        ));
    }
    let expiry = document["Expiration"]
        .as_str()
        .and_then(|at| at.parse::<jiff::Timestamp>().ok())
        .map(SystemTime::from);
    Ok(Fetched {
        role: Some(role),
        expiry,
        has_token: document["Token"].as_str().is_some_and(|t| !t.is_empty()),
    })
}

/// One `provide_credentials` call on the one provider.
async fn fetch_with_provider(provider: &ImdsCredentialsProvider) -> Result<Fetched, String> {
    let credentials = provider
        .provide_credentials()
        .await
        .map_err(|e| aws_sdk_sts::error::DisplayErrorContext(&e).to_string())?;
    Ok(Fetched {
        role: None,
        expiry: credentials.expiry(),
        has_token: credentials.session_token().is_some_and(|t| !t.is_empty()),
    })
}

/// The role to print ("-" where the API does not name it), or why the fetch is no good.
fn check(fetched: &Fetched, args: &LoadArgs) -> Result<String, String> {
    if let Some(role) = &fetched.role
        && !args.roles.contains(role)
    {
        return Err(format!("role {role}, expected one of {:?}", args.roles));
    }
    if !fetched.has_token {
        return Err("no session token".into());
    }
    let left = fetched
        .expiry
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .map_or(0, |d| d.as_secs());
    if left < args.min_left {
        return Err(format!("only {left}s left"));
    }
    Ok(fetched.role.clone().unwrap_or_else(|| "-".into()))
}
