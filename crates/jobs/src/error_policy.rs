//! What a job does when an I/O request fails (QAPI `BlockdevOnError`), and the I/O status it
//! reports (QAPI `BlockDeviceIoStatus`).

/// The on-error policy of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Report,
    Ignore,
    Enospc,
    Stop,
    Auto,
}

impl OnError {
    pub fn parse(name: &str) -> Option<OnError> {
        Some(match name {
            "report" => OnError::Report,
            "ignore" => OnError::Ignore,
            "enospc" => OnError::Enospc,
            "stop" => OnError::Stop,
            "auto" => OnError::Auto,
            _ => return None,
        })
    }

    /// The action for an error with `errno` (block_job_error_action): `enospc` and `auto`
    /// stop on ENOSPC and report anything else.
    pub fn action_for(self, errno: i32) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto if errno == libc::ENOSPC => ErrorAction::Stop,
            OnError::Enospc | OnError::Auto => ErrorAction::Report,
        }
    }
}

/// What was done about one error (`BLOCK_JOB_ERROR`'s `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    Report,
    Ignore,
    Stop,
}

impl ErrorAction {
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

/// The I/O status a job reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

impl IoStatus {
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// The text QEMU puts in `BLOCK_JOB_COMPLETED`'s `error`: strerror of the errno.
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_auto_stop_only_on_enospc() {
        for policy in [OnError::Enospc, OnError::Auto] {
            assert_eq!(policy.action_for(28), ErrorAction::Stop);
            assert_eq!(policy.action_for(5), ErrorAction::Report);
        }
        assert_eq!(OnError::Stop.action_for(5), ErrorAction::Stop);
        assert_eq!(OnError::Ignore.action_for(28), ErrorAction::Ignore);
    }

    #[test]
    fn strerror_reads_like_qemu() {
        assert_eq!(strerror(5), "Input/output error");
        assert_eq!(strerror(28), "No space left on device");
    }
}
