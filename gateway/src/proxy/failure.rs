//! What the client is told when proxying fails after the retry: the status
//! and the problem detail, from Pingora's error.

use pingora::{Error, ErrorSource, ErrorType};

/// The status for a request the proxy could not complete, as Pingora's
/// default answer would pick it, except that an upstream timeout is a 504
/// rather than a 502 so a buyer's client and the metrics can tell a slow
/// backend from a broken one. `None`: the client's own connection is gone,
/// there is nobody to answer.
pub(super) fn failure_status(e: &Error) -> Option<u16> {
    use ErrorType::*;
    match (e.etype(), e.esource()) {
        (HTTPStatus(code), _) => Some(*code),
        (ConnectTimedout | ReadTimedout | WriteTimedout, ErrorSource::Upstream) => Some(504),
        (_, ErrorSource::Upstream) => Some(502),
        (WriteError | ReadError | ConnectionClosed, ErrorSource::Downstream) => None,
        (_, ErrorSource::Downstream) => Some(400),
        (_, ErrorSource::Internal | ErrorSource::Unset) => Some(500),
    }
}

/// The problem detail for [`failure_status`]: the gateway's own refusals
/// keep their explanation; an upstream failure names the pool and the kind
/// of failure (never a backend address) so the buyer's report, the gateway
/// log line with the same request id, and the metrics line up.
pub(super) fn failure_detail(e: &Error, pool: Option<&str>, attempts: u32) -> String {
    match (e.etype(), e.esource()) {
        (ErrorType::HTTPStatus(_), _) => e
            .context
            .as_ref()
            .map(|c| c.as_str().to_string())
            .unwrap_or_else(|| "request refused".into()),
        (kind, ErrorSource::Upstream) => format!(
            "upstream pool `{}` failed: {} (attempts: {attempts})",
            pool.unwrap_or("?"),
            kind.as_str()
        ),
        (kind, _) => format!("the request could not be proxied: {}", kind.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(kind: ErrorType) -> Box<Error> {
        Error::new_up(kind)
    }

    #[test]
    fn failure_status_tells_timeouts_from_broken_backends() {
        assert_eq!(
            failure_status(&upstream(ErrorType::ConnectTimedout)),
            Some(504)
        );
        assert_eq!(
            failure_status(&upstream(ErrorType::ReadTimedout)),
            Some(504)
        );
        assert_eq!(
            failure_status(&upstream(ErrorType::ConnectRefused)),
            Some(502)
        );
        assert_eq!(
            failure_status(&upstream(ErrorType::ConnectionClosed)),
            Some(502)
        );
        let refusal = Error::explain(
            ErrorType::HTTPStatus(503),
            "pool api has no healthy backend",
        );
        assert_eq!(failure_status(&refusal), Some(503));
        assert_eq!(
            failure_status(&Error::new_down(ErrorType::ConnectionClosed)),
            None,
            "nobody left to answer"
        );
        assert_eq!(
            failure_status(&Error::new_down(ErrorType::InvalidHTTPHeader)),
            Some(400)
        );
        assert_eq!(
            failure_status(&Error::new_in(ErrorType::InternalError)),
            Some(500)
        );
    }

    #[test]
    fn failure_detail_names_the_pool_and_kind_never_the_backend() {
        let e = upstream(ErrorType::ConnectRefused).more_context("peer: 127.0.0.1:8081");
        let detail = failure_detail(&e, Some("api"), 2);
        assert!(detail.contains("`api`"), "{detail}");
        assert!(detail.contains("ConnectRefused"), "{detail}");
        assert!(detail.contains("attempts: 2"), "{detail}");
        assert!(!detail.contains("8081"), "{detail}");
        let refusal = Error::explain(
            ErrorType::HTTPStatus(503),
            "pool api has no healthy backend",
        );
        assert_eq!(
            failure_detail(&refusal, Some("api"), 1),
            "pool api has no healthy backend"
        );
    }
}
