//! QMP errors: the error classes on the wire and the one place that maps the errors of the
//! layers below (job verbs, block layer) to them.

use imgstream_jobs::VerbError;

/// QAPI's `QapiErrorClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    /// A block job verb named a job that does not exist.
    DeviceNotActive,
    DeviceNotFound,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// An error answer: class and QEMU's description text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }
}

/// Errors of the layers below, as they reach a client.
#[derive(Debug)]
pub enum Failure {
    /// A job refused a verb in its state (QEMU's text is in the error).
    Verb(VerbError),
    /// The block layer failed.
    Block(imgstream_block::Error),
    /// A `block-job-*` verb named no job.
    BlockJobNotFound(String),
    /// A `job-*` verb named no job.
    JobNotFound,
}

/// The one mapping from our errors to QMP classes and texts.
pub fn to_qmp(failure: Failure) -> QmpError {
    match failure {
        Failure::Verb(e) => QmpError::generic(e.0),
        Failure::Block(e) => QmpError::generic(e.to_string()),
        Failure::BlockJobNotFound(id) => QmpError::new(
            ErrorClass::DeviceNotActive,
            format!("Block job '{id}' not found"),
        ),
        Failure::JobNotFound => QmpError::generic("Job not found"),
    }
}

impl From<Failure> for QmpError {
    fn from(failure: Failure) -> Self {
        to_qmp(failure)
    }
}
