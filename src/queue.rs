//! The queue engine is its own crate, `aiq-queue` (the Redis layout, the Lua scripts, leases and
//! acknowledgements, the apalis backend, the stats); this module is its face in the daemon,
//! with the one thing the daemon adds: jobs are enqueued with aiq's [`JobKind`].

use crate::domain::JobKind;

pub use aiq_queue::{
    COUNTER_EVENTS, DeadJob, ENQUEUE_LUA, Enqueued, LeasedJob, MINUTE_EVENTS, Minute, Outcome,
    Queue, QueueError, QueueStats, Settlement, SkippedValues, backend, events,
};

/// A job to enqueue, of one of aiq's kinds.
pub type NewJob = aiq_queue::NewJob<JobKind>;
