//! Job states, the transitions between them and the verbs each state accepts, as QEMU's job.c
//! defines them (JobSTT, JobVerbTable).

/// The state of a job (QAPI `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    /// The name used on the wire.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether QEMU's transition table allows going from `self` to `next`.
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }
}

/// What a client may ask of a job (QAPI `JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Change,
    Complete,
    Finalize,
    Dismiss,
}

impl JobVerb {
    pub fn name(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Change => "change",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// Whether a job in `status` accepts this verb (QEMU's JobVerbTable).
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed | JobVerb::Change => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(status, Ready | Standby),
            JobVerb::Finalize => status == Pending,
            JobVerb::Dismiss => status == Concluded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_path_and_cancel_path_are_legal_transitions() {
        use JobStatus::*;
        let success = [
            Undefined, Created, Running, Waiting, Pending, Concluded, Null,
        ];
        let cancel = [Running, Aborting, Concluded, Null];
        for path in [&success[..], &cancel[..]] {
            for pair in path.windows(2) {
                assert!(
                    pair[0].can_become(pair[1]),
                    "{:?} -> {:?}",
                    pair[0],
                    pair[1]
                );
            }
        }
        assert!(!Running.can_become(Concluded));
        assert!(!Concluded.can_become(Running));
    }

    #[test]
    fn verbs_follow_qemus_table() {
        assert!(JobVerb::Cancel.allowed_in(JobStatus::Pending));
        assert!(!JobVerb::Cancel.allowed_in(JobStatus::Concluded));
        assert!(!JobVerb::Complete.allowed_in(JobStatus::Running));
        assert!(JobVerb::Finalize.allowed_in(JobStatus::Pending));
        assert!(!JobVerb::Dismiss.allowed_in(JobStatus::Pending));
        assert!(JobVerb::SetSpeed.allowed_in(JobStatus::Paused));
        assert!(!JobVerb::Pause.allowed_in(JobStatus::Waiting));
    }
}
