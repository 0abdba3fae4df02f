//! The job framework (states, pause, cancel, rate limit, error policies, events) and the
//! stream job, on top of the block layer.

pub mod error_policy;
pub mod job;
pub mod rate_limit;
pub mod space_reservation;
pub mod status;
pub mod stream;
pub mod writeback_pacer;
pub mod writeback_starter;

pub use error_policy::{ErrorAction, IoStatus, OnError};
pub use job::{Job, JobControl, JobError, JobEvent, JobInfo, JobOptions, JobWork, VerbError};
pub use status::{JobStatus, JobVerb};
pub use stream::{StreamJob, StreamOptions, FLUSH_INTERVAL, STREAM_CHUNK};
