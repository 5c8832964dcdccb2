//! The generated gRPC API (`uffdpager.v1`) and its file descriptor set for reflection.

#![allow(missing_docs, missing_debug_implementations, clippy::all)]

tonic::include_proto!("uffdpager.v1");

/// Encoded `FileDescriptorSet` of every `uffdpager.v1` proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("uffdpager_descriptor");
