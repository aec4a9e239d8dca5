//! What can stop a command of `idem`, with its cause kept.

use std::process::ExitCode;

/// An error that ends a command: exit status 2 (1 is kept for "ran, and found a problem").
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A store or barrier error.
    #[error(transparent)]
    Idem(#[from] idem::Error),
    /// An I/O error of the command itself: `what` it was doing, and why it failed.
    #[error("{what}")]
    Io {
        /// What the command was doing.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The Prometheus recorder of `idem serve` could not be installed.
    #[error("cannot install the metrics recorder")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    /// `idem audit` refused its arguments (nothing was sent) or could not run.
    #[error("idem audit")]
    Audit(#[from] idem_audit::AuditError),
    /// The lab or the demo was given a database file that exists: they write a new one
    /// and never overwrite a file.
    #[error("{} exists: this run writes a new database and never overwrites a file; remove it or name another", .0.display())]
    Exists(std::path::PathBuf),
    /// An operator command found no records table (or no SQLite file) where it was told to
    /// look, and created none: exit status [`EXIT_MISSING`].
    #[error("{0}")]
    Missing(String),
    /// An operator command could not reach its server within the connect timeout: exit
    /// status [`EXIT_CONNECT`].
    #[error("cannot connect to {what}")]
    Connect {
        /// The server (`PostgreSQL at 127.0.0.1:5432`), without credentials.
        what: String,
        /// Why: refused, timed out, name not resolved, authentication failed.
        #[source]
        source: idem::BoxError,
    },
}

/// Exit status of an operator command that found no records table where it looked.
pub const EXIT_MISSING: u8 = 3;
/// Exit status of an operator command that could not connect to its server.
pub const EXIT_CONNECT: u8 = 4;

impl CliError {
    /// `source`, while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            what: what.into(),
            source,
        }
    }

    /// The exit status for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Audit(_) => ExitCode::from(idem_audit::EXIT_USAGE),
            CliError::Missing(_) => ExitCode::from(EXIT_MISSING),
            CliError::Connect { .. } => ExitCode::from(EXIT_CONNECT),
            _ => ExitCode::from(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem::ErrorChain;

    #[test]
    fn io_errors_keep_their_cause_and_chains_show_each_cause_once() {
        let e = CliError::io(
            "cannot listen on 127.0.0.1:1",
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied"),
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot listen on 127.0.0.1:1: permission denied"
        );
        let store = CliError::from(idem::Error::retryable("connection refused"));
        assert_eq!(
            ErrorChain(&store)
                .to_string()
                .matches("connection refused")
                .count(),
            1
        );
        assert_eq!(e.exit_code(), ExitCode::from(2));
    }
}
