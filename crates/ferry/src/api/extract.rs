//! Request bodies: JSON bodies decoded with every failure answered as `{"error": ...}` (400
//! for bad JSON or wrong types, 415 without a JSON content type, 413 past the size limit),
//! and routes without a body refusing one.
use super::handlers::ApiError;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Largest request body accepted (every body here is a few hundred bytes).
pub const MAX_BODY: usize = 64 << 10;

/// A JSON body of type `T`.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(json_error(r)),
        }
    }
}

fn json_error(r: JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "this route takes a JSON body: send Content-Type: application/json".into(),
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {}", e.body_text()),
        ),
        JsonRejection::JsonDataError(e) => ApiError(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {}", e.body_text()),
        ),
        JsonRejection::BytesRejection(b) => bytes_error(b),
        other => ApiError(other.status(), other.body_text()),
    }
}

fn bytes_error(b: BytesRejection) -> ApiError {
    if b.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {MAX_BODY} bytes"),
        );
    }
    ApiError(b.status(), format!("reading the body: {}", b.body_text()))
}

/// A route that takes no body: any body is refused (a client sending one is confused about
/// what the route does).
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let b = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(bytes_error)?;
        if b.iter().all(u8::is_ascii_whitespace) {
            return Ok(NoBody);
        }
        Err(ApiError(
            StatusCode::BAD_REQUEST,
            "this route takes no body".into(),
        ))
    }
}

/// Unknown paths.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such route: {}", uri.path()),
    )
}

/// Known paths with another method.
pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {} (see ferry's API table)",
            uri.path()
        ),
    )
}
