//! The one place that classifies etcd client errors (the table in the crate docs).

use etcd_client::Error as EtcdError;
use idem_core::Error;
use tonic::Code;

/// Maps an etcd client error to a retryable or permanent [`Error::Store`], keeping it as the
/// source.
///
/// Retryable: the cluster or the connection failed and the same call may succeed later —
/// transport errors, `Unavailable` (no leader, leader changed, request timed out, member
/// stopped), `DeadlineExceeded` and `Cancelled` (the request timeout), `Aborted`, a
/// compacted or future revision (`OutOfRange`: a scan pinned to a revision that was
/// compacted meanwhile), `ResourceExhausted` "too many requests", `FailedPrecondition`
/// "not leader", `Unknown` (tonic's code for broken HTTP/2 streams).
///
/// Permanent: the request itself is refused and would be refused again — `InvalidArgument`
/// (request too large, too many operations), `ResourceExhausted` for a message over the
/// gRPC size limit or `database space exceeded` (an operator must compact and defragment),
/// `PermissionDenied`, `Unauthenticated`, `Unimplemented`, `Internal` (an undecodable
/// response), `DataLoss` (corrupt cluster), `NotFound`, `AlreadyExists`, and the client's
/// own configuration errors (bad endpoint URI, invalid arguments).
pub(crate) fn map_err(e: EtcdError) -> Error {
    let retryable = match &e {
        EtcdError::TransportError(_) | EtcdError::IoError(_) => true,
        EtcdError::GRpcStatus(status) => {
            let message = status.message();
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::OutOfRange
                | Code::Unknown => true,
                Code::ResourceExhausted => message.contains("too many requests"),
                Code::FailedPrecondition => message.contains("not leader"),
                _ => false,
            }
        }
        _ => false,
    };
    Error::Store {
        retryable,
        source: Box::new(e),
    }
}

/// Whether the request never left the client: no connection to the member it was routed to
/// could be made. Such a request cannot have taken effect, so the store sends it again (to
/// another member, as the client balances) instead of reporting an indeterminate failure.
pub(crate) fn never_sent(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(status) => {
            status.code() == Code::Unavailable && status.message().starts_with("tcp connect error")
        }
        _ => false,
    }
}
