//! Answers the gateway writes itself: RFC 9457 `application/problem+json`
//! errors and JSON bodies, so every refusal a buyer sees has the same shape
//! as the api's.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::json;

/// A response the gateway produces locally.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// The RFC 9457 document every local error uses (proxy, admin, rules):
/// `type` is `about:blank` with the status's standard title.
pub fn problem_body(status: u16, detail: &str) -> serde_json::Value {
    let title = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    json!({
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    })
}

impl LocalResponse {
    /// A problem document; see [`problem_body`].
    pub fn problem(status: u16, detail: impl Into<String>) -> LocalResponse {
        let body = problem_body(status, &detail.into());
        LocalResponse {
            status,
            headers: vec![("content-type".into(), "application/problem+json".into())],
            body: Bytes::from(body.to_string()),
        }
    }

    /// A JSON body.
    pub fn json(status: u16, value: &serde_json::Value) -> LocalResponse {
        LocalResponse {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(value.to_string()),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> LocalResponse {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    /// Writes the whole response to the downstream session.
    pub async fn write(self, session: &mut Session, request_id: &str) -> pingora::Result<()> {
        self.write_ref(session, request_id).await
    }

    /// [`LocalResponse::write`] for a shared answer (a rule shortcut).
    pub async fn write_ref(&self, session: &mut Session, request_id: &str) -> pingora::Result<()> {
        let mut header = answer_header(self.status, self.headers.len() + 3)?;
        for (name, value) in &self.headers {
            header.append_header(name.clone(), value.as_str())?;
        }
        write_whole(session, header, self.body.clone(), request_id).await
    }
}

/// The header of an answer the gateway makes itself, room for `headers`.
/// It keeps no record of each name's case: the names are the gateway's own,
/// and Pingora's case-preserving second map would cost an insert and an
/// allocation per header on every local answer (the sold-out crowd's
/// 410s included); they go out in Pingora's title case instead.
pub fn answer_header(status: u16, headers: usize) -> pingora::Result<ResponseHeader> {
    ResponseHeader::build_no_case(status, Some(headers))
}

/// Writes an answer the gateway makes itself, whole: its length, the
/// request id, `Connection: close` while draining, then header and body.
/// Every local answer (a problem, a rule's, a micro-cached page) ends here.
pub async fn write_whole(
    session: &mut Session,
    mut header: ResponseHeader,
    body: Bytes,
    request_id: &str,
) -> pingora::Result<()> {
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("x-request-id", request_id)?;
    if crate::drain::is_draining() {
        header.insert_header("connection", "close")?;
        session.set_keepalive(None);
    }
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await
}
