//! OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with the status that
//! goes with them (serving-and-quant-conventions.md). Bad input is a 4xx, never a 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: a bad field (`param`) or value.
    pub fn bad(param: impl Into<Option<String>>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    /// 400 for a body that does not deserialize: the field's path (or, for a missing field,
    /// its name) as `param`.
    pub fn from_serde<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ApiError {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next());
        match (path.as_str(), missing) {
            (".", Some(f)) => ApiError::bad(f.to_string(), format!("{f}: missing field")),
            (".", None) => ApiError::bad(None, inner),
            _ => ApiError::bad(path.clone(), format!("{path}: {inner}")),
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "invalid or missing API key: send `Authorization: Bearer KEY`".into(),
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn not_found(message: impl Into<String>, code: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: None,
            code: Some(code),
        }
    }

    /// 503: the model is loading, the queue is full, or the server is shutting down.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 500: the engine failed while running a request (never bad input).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "invalid_request_error",
            413 => "invalid_request_error",
            503 => "server_overloaded",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The error object (also the payload of an error event in a stream).
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}
