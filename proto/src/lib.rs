//! Generated code of the `imagegen.v1` gRPC API, and its file descriptor set for reflection.

#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

/// `imagegen.v1`: messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("imagegen.v1");
}

/// The encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("imagegen_descriptor");
