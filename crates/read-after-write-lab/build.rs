//! Generates the gRPC code of the tonic example (`examples/tonic/posts.proto`)
//! without `protoc`: `protox` parses the file into a descriptor set in pure
//! Rust and `tonic-prost-build` generates the client and server from it.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest_dir.join("../../examples/tonic");
    let proto = proto_dir.join("posts.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    println!("cargo:rerun-if-changed=build.rs");

    // A relative name is looked up in the include paths, like an `import`.
    let descriptors = protox::compile(["posts.proto"], [&proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
