//! The client side of imagegen: the scripted-user demo and the training-round helper that the
//! `imagegen` CLI and the end-to-end tests share. It speaks only gRPC.

pub mod demo;
