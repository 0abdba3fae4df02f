//! The job framework and the stream job.
