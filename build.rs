//! Compiles `proto/uffdpager/v1/*.proto` with a vendored protoc and emits the file descriptor set
//! that the gRPC servers publish through reflection. (The pager's C file is `pager/build.rs`'s.)

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    env::set_var("PROTOC", protoc);
    let include = protoc_bin_vendored::include_path()?;

    let dir = PathBuf::from("proto/uffdpager/v1");
    let mut protos: Vec<PathBuf> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    protos.sort();
    println!("cargo:rerun-if-changed={}", dir.display());
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("uffdpager_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto"), include])?;
    Ok(())
}
