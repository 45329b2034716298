//! Generated code for Ferroserve's gRPC contracts. Nothing else lives here: conversion to domain types
//! happens at the edges (router and worker crates).

/// The public API, package `ferroserve.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ferroserve.v1");
}

/// The router-to-worker contract, package `ferroserve.worker.v1`.
pub mod worker {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("ferroserve.worker.v1");
}

/// Encoded `FileDescriptorSet` of both packages, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferroserve_descriptor");
