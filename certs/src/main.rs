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
    if !args.force {
        podiam_certs::check_absent(&args.out, args.secrets.as_deref())?;
    }
    let bundle = podiam_certs::generate(&args.options())?;
    let files = bundle.write_to(&args.out, args.force)?;
    println!(
        "wrote CA, server and agent certificates and keys to {}",
        args.out.display()
    );
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
            .write_secrets(path, &args.namespace, args.force)
            .context("writing the Secret manifests")?;
        println!("wrote Secret manifests to {}", path.display());
    }
    Ok(())
}
