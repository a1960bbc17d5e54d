//! The learning store: trajectories, feedback, idempotency keys and the ledger of trained pairs.

pub(crate) mod buffer;
