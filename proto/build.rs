//! Generates the gRPC code from `proto/ringcache/v1/*.proto`.
//!
//! This is the only generation path: the code is generated at build time into
//! `OUT_DIR` with the `protoc` binary shipped by `protoc-bin-vendored`, so a
//! fresh clone builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Values and keys are handed around without copying on the read path.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ringcache_v1_descriptor.bin"))
        .compile_with_config(config, &["proto/ringcache/v1/cache.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
