//! Generates the gRPC contract's Rust code from `proto/podiam.proto` at build time, with the
//! vendored `protoc` so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Credentials and a credentials request (a pod's token) carry secrets: their Debug is
    // written by hand in src/lib.rs and redacts.
    config.skip_debug(["podiam.v1.Credentials", "podiam.v1.GetCredentialsRequest"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/podiam.proto"],
        &["proto"],
    )?;
    Ok(())
}
