//! The one place where errors of every layer become HTTP answers. Statuses follow RFC 7030:
//! 400 malformed, 401 unauthenticated, 403 refused by policy, 404, 405, 413, 415, 429 rate
//! limited (with `Retry-After`); 5xx only for our own failures. Bodies are `text/plain` and say what was wrong.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper::Response;

use crate::auth::AuthError;
use crate::est::{media, ProtocolError};
use crate::issue::fallback::OutsideFallback;
use crate::issue::{IssueError, UpstreamError};
use crate::journal::JournalError;
use crate::policy::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    NotFound(String),
    #[error("{operation} takes {allowed}")]
    MethodNotAllowed {
        operation: &'static str,
        allowed: Method,
    },
    #[error("unsupported Content-Type {0:?}: send the CSR as application/pkcs10")]
    UnsupportedMediaType(String),
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    #[error("the request body could not be read: {0}")]
    BodyRead(String),
    /// On the API proxy's socket: the forwarded client certificate header is unusable.
    #[error("malformed x-ms-edge-clientcert header from the API proxy: {0}")]
    ForwardedCertificate(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// An `auto` label with its upstream away, asked for more than its fallback allowance.
    #[error(transparent)]
    OutsideFallback(#[from] OutsideFallback),
    #[error("the certificate could not be issued: {0}")]
    Issue(#[from] IssueError),
    #[error("the certificate could not be recorded, so it is not issued: {0}")]
    Journal(#[from] JournalError),
    #[error("server-side key generation failed: {0}")]
    KeyGeneration(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("too many {scope}: retry after {retry_after} s")]
    RateLimited {
        /// What there were too many of: `requests from this address`, `failed
        /// authentications from this address`, `certificates for this name`, ...
        scope: &'static str,
        retry_after: u64,
    },
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NotFound(_) => StatusCode::NOT_FOUND,
            RequestError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RequestError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RequestError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            RequestError::BodyRead(_)
            | RequestError::Protocol(_)
            | RequestError::ForwardedCertificate(_) => StatusCode::BAD_REQUEST,
            RequestError::Auth(_) => StatusCode::UNAUTHORIZED,
            RequestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            RequestError::Refused(_) | RequestError::OutsideFallback(_) => StatusCode::FORBIDDEN,
            RequestError::Issue(_) | RequestError::Journal(_) | RequestError::KeyGeneration(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            RequestError::Upstream(e) => match e {
                UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                UpstreamError::Refused { status, .. } => *status,
                UpstreamError::Pending { .. } => StatusCode::ACCEPTED,
                // Busy upstream: the child gets the same answer and waits as told.
                UpstreamError::Unavailable { status, .. }
                    if *status == StatusCode::SERVICE_UNAVAILABLE
                        || *status == StatusCode::TOO_MANY_REQUESTS =>
                {
                    *status
                }
                UpstreamError::Unavailable { .. }
                | UpstreamError::Malformed(_)
                | UpstreamError::Misconfigured { .. } => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// The answer. `basic_realm` adds the Basic challenge to 401s on labels that take Basic.
    pub fn into_response(self, basic_realm: Option<&str>) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut text = self.to_string();
        text.push('\n');
        let mut response = Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(media::TEXT_PLAIN));
        match &self {
            RequestError::MethodNotAllowed { allowed, .. } => {
                if let Ok(v) = HeaderValue::from_str(allowed.as_str()) {
                    headers.insert(ALLOW, v);
                }
            }
            RequestError::Auth(_) => {
                if let Some(realm) = basic_realm {
                    let challenge = format!("Basic realm=\"{realm}\", charset=\"UTF-8\"");
                    if let Ok(v) = HeaderValue::from_str(&challenge) {
                        headers.insert(WWW_AUTHENTICATE, v);
                    }
                }
            }
            RequestError::Upstream(e) => {
                let retry_after = match e {
                    UpstreamError::Unreachable { retry_after, .. }
                    | UpstreamError::Timeout { retry_after, .. } => {
                        HeaderValue::from_str(&retry_after.to_string()).ok()
                    }
                    UpstreamError::Pending { retry_after }
                    | UpstreamError::Unavailable { retry_after, .. } => retry_after.clone(),
                    _ => None,
                };
                if let Some(v) = retry_after {
                    headers.insert(RETRY_AFTER, v);
                }
            }
            RequestError::RateLimited { retry_after, .. } => {
                if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                    headers.insert(RETRY_AFTER, v);
                }
                // The request's body, if any, is not read.
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            // The rest of an oversized or stalled body is not read: close the connection.
            RequestError::BodyTooLarge(_)
            | RequestError::BodyTimeout
            | RequestError::BodyRead(_) => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
