//! The trainer lease: exactly one process trains at a time. It is a key in a KV bucket whose
//! max age is the lease's TTL; the holder rewrites it (revision-checked) every third of the TTL,
//! others try to create it, which succeeds only once the holder stopped renewing and the entry
//! aged out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{kv, stream};

use super::{Nats, NatsMetrics};
use crate::store::StoreError;

const LEASE_BUCKET: &str = "imagegen_trainer_lease";
const LEASE_KEY: &str = "trainer";

/// This process's view of the lease.
#[derive(Debug, Clone)]
pub(crate) struct TrainerLease {
    held: Arc<AtomicBool>,
}

impl TrainerLease {
    /// Starts competing for the lease as `holder`.
    pub(crate) async fn start(
        nats: &Nats,
        ttl: Duration,
        holder: String,
    ) -> Result<Self, StoreError> {
        let bucket = nats
            .bucket(kv::Config {
                bucket: LEASE_BUCKET.into(),
                history: 1,
                max_age: ttl,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        let held = Arc::new(AtomicBool::new(false));
        tokio::spawn(keep(
            bucket,
            ttl,
            holder,
            held.clone(),
            nats.metrics.clone(),
        ));
        Ok(Self { held })
    }

    /// The flag itself (for the trainer's gate).
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        self.held.clone()
    }
}

async fn keep(
    bucket: kv::Store,
    ttl: Duration,
    holder: String,
    held: Arc<AtomicBool>,
    metrics: NatsMetrics,
) {
    let mut revision = None;
    let mut renewed = Instant::now();
    loop {
        let value = holder.clone().into_bytes().into();
        revision = match revision {
            None => match bucket.create(LEASE_KEY, value).await {
                Ok(r) => {
                    tracing::info!(%holder, "took the trainer lease");
                    renewed = Instant::now();
                    Some(r)
                }
                Err(_) => None,
            },
            Some(r) => match bucket.update(LEASE_KEY, value, r).await {
                Ok(r) => {
                    renewed = Instant::now();
                    Some(r)
                }
                Err(e) if renewed.elapsed() < ttl / 2 => {
                    tracing::warn!(error = %e, "renewing the trainer lease; retrying");
                    Some(r)
                }
                Err(e) => {
                    tracing::error!(error = %e, "lost the trainer lease: training stops");
                    None
                }
            },
        };
        // Held only while renewed recently enough that nobody else can have taken it over.
        let holds = revision.is_some() && renewed.elapsed() < ttl / 2;
        held.store(holds, Ordering::Release);
        metrics.lease_held.set(i64::from(holds));
        tokio::time::sleep(if revision.is_some() { ttl / 4 } else { ttl / 5 }).await;
    }
}
