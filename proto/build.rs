//! Compiles `lockstep/v1/*.proto` with protox (a protobuf compiler in Rust), so building needs
//! no `protoc` on the machine; the generated code lands in `OUT_DIR`, never in the tree.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["lockstep/v1/rendezvous.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
