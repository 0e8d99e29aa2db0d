//! `podiam-certs`: writes the CA, server and agent certificates (and optionally the
//! Kubernetes Secrets) that podiam's mutual TLS needs. See the library for what is in them.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use podiam_certs::cli::Args;

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, whatever RUST_BACKTRACE says.
            eprintln!("podiam-certs: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let (bundle, files) = if args.renew {
        let read = |name: &str| {
            let path = args.out.join(name);
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading {} (--renew needs the CA)", path.display()))
        };
        let ca_cert = read(podiam_certs::CA_CERT_FILE)?;
        let ca_key = read(podiam_certs::CA_KEY_FILE)?;
        let bundle = podiam_certs::renew(&ca_cert, &ca_key, &args.options())?;
        let files = bundle.replace_leaves_in(&args.out)?;
        println!(
            "issued new server and agent certificates and keys from the CA in {}",
            args.out.display()
        );
        (bundle, files)
    } else {
        if !args.force {
            podiam_certs::check_absent(&args.out, args.secrets.as_deref())?;
        }
        let bundle = podiam_certs::generate(&args.options())?;
        let files = bundle.write_to(&args.out, args.force)?;
        println!(
            "wrote CA, server and agent certificates and keys to {}",
            args.out.display()
        );
        (bundle, files)
    };
    println!("  CA: {}", files.ca_cert.display());
    println!(
        "  server: {} (key {})",
        files.server_cert.display(),
        files.server_key.display()
    );
    println!(
        "  agent: {} (key {})",
        files.agent_cert.display(),
        files.agent_key.display()
    );
    if let Some(path) = &args.secrets {
        bundle
            .write_secrets(path, &args.namespace, args.force || args.renew)
            .context("writing the Secret manifests")?;
        println!("wrote Secret manifests to {}", path.display());
    }
    if let Some(path) = &args.webhook_ca_patch {
        podiam_certs::write_webhook_ca_patch(path, &bundle.ca_cert)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote the webhook's caBundle patch to {}", path.display());
    }
    Ok(())
}
