//! Compiles the pager's one C file: the SIGBUS-guarded read of memory-file mappings
//! (`guarded_read.rs`).

fn main() {
    println!("cargo:rerun-if-changed=guarded_read.c");
    cc::Build::new().file("guarded_read.c").warnings(true).compile("guarded_read");
}
