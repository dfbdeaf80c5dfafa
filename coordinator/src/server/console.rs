//! The web console at `/ui/`: a small single-page app (`coordinator/console/`: HTML, CSS and
//! JavaScript, no external code) embedded in the binary at build time, so an air-gapped cluster
//! serves it with nothing else installed. It has no powers of its own: it signs in with an API
//! token (held in the browser tab's session storage) and every read and action is an admin API
//! call with that token, so the API's role checks apply unchanged.
//!
//! The pages are public (they hold no data); the data comes from the token-checked API. Every
//! response carries a strict Content-Security-Policy (only this origin's script and style, no
//! inline code, no framing) and `nosniff`. Cross-site request forgery has nothing to ride on:
//! the API authenticates by an `Authorization` header that a browser never adds on its own (no
//! cookie), and it serves no CORS headers.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::api::Shared;

const INDEX: &str = include_str!("../../console/index.html");
const APP_JS: &str = include_str!("../../console/app.js");
const APP_CSS: &str = include_str!("../../console/app.css");

/// The policy every console response carries.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The console's paths (public: they are static and hold no data).
pub const PATHS: [&str; 4] = ["/ui", "/ui/", "/ui/app.js", "/ui/app.css"];

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The same binary serves the same assets: revalidate, never serve a stale console.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
