//! The operator console: one static page over the admin API (`/v1/*`),
//! embedded in the binary and served by the admin listener at `/console`.
//!
//! The files hold no data, so they are served without the bearer token; the
//! page asks for the token, keeps it in `sessionStorage` and sends it on each
//! `/v1/*` call it makes (never a cookie: no CSRF surface). Every response
//! carries a strict Content-Security-Policy (scripts and styles from the
//! console's own files only, nothing inline, no framing) and `no-store`.
//! Values from KooGallery and the billing core reach the DOM as text only
//! (`textContent`, never `innerHTML`): `src/console/app.js`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Response, StatusCode};

use crate::http::Body;

/// Where the console lives on the admin listener.
pub const PREFIX: &str = "/console";

/// The policy of every console response: nothing but the console's own
/// script, style sheet and API calls; no inline code, no plugins, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's files: (path, content type, bytes).
const FILES: &[(&str, &str, &[u8])] = &[
    ("/console", "text/html; charset=utf-8", include_bytes!("console/index.html")),
    ("/console/", "text/html; charset=utf-8", include_bytes!("console/index.html")),
    ("/console/app.js", "text/javascript; charset=utf-8", include_bytes!("console/app.js")),
    ("/console/app.css", "text/css; charset=utf-8", include_bytes!("console/app.css")),
];

/// Is this a console path (`/console`, `/console/…`)? Pure.
pub fn is_console(path: &str) -> bool {
    path == PREFIX || path.starts_with("/console/")
}

/// The file at `path`, if the console has one: (content type, bytes). Pure.
pub fn file(path: &str) -> Option<(&'static str, &'static [u8])> {
    FILES.iter().find(|(p, _, _)| *p == path).map(|(_, kind, bytes)| (*kind, *bytes))
}

/// The answer to a request for a console path: the file (GET, HEAD), 405 for
/// another method, 404 for a path the console has no file at; every answer
/// with the console's security headers.
pub fn serve(method: &Method, path: &str) -> Response<Body> {
    let (status, kind, body) = match (method, file(path)) {
        (&Method::GET, Some((kind, bytes))) => (StatusCode::OK, kind, Bytes::from_static(bytes)),
        (&Method::HEAD, Some((kind, _))) => (StatusCode::OK, kind, Bytes::new()),
        (_, Some(_)) => {
            (StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", Bytes::from_static(b"GET only\n"))
        }
        (_, None) => {
            (StatusCode::NOT_FOUND, "text/plain; charset=utf-8", Bytes::from_static(b"no such console file\n"))
        }
    };
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert("content-security-policy", HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(res: &'a Response<Body>, name: &str) -> &'a str {
        res.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The first `on…=` attribute of `html` (an inline event handler), if any.
    fn handler_attribute(html: &str) -> Option<&str> {
        html.match_indices(" on").find_map(|(i, _)| {
            let rest = &html[i + 1..];
            let name_len = rest[2..].find(|c: char| !c.is_ascii_alphabetic()).map(|n| n + 2)?;
            (name_len > 2 && rest[name_len..].trim_start().starts_with('=')).then(|| &rest[..name_len])
        })
    }

    #[test]
    fn the_handler_check_finds_handlers_only() {
        assert_eq!(handler_attribute(r#"<img src=x onerror=alert(1)>"#), Some("onerror"));
        assert_eq!(handler_attribute(r#"<body onload ="x">"#), Some("onload"));
        assert_eq!(handler_attribute("<p>this tab only, one on top</p>"), None);
    }

    #[test]
    fn console_paths_are_recognised_and_others_are_not() {
        assert!(is_console("/console") && is_console("/console/") && is_console("/console/app.js"));
        assert!(!is_console("/consoles") && !is_console("/v1/console") && !is_console("/"));
    }

    #[test]
    fn each_file_has_its_type_and_every_answer_the_security_headers() {
        for (path, kind) in [
            ("/console", "text/html; charset=utf-8"),
            ("/console/", "text/html; charset=utf-8"),
            ("/console/app.js", "text/javascript; charset=utf-8"),
            ("/console/app.css", "text/css; charset=utf-8"),
            ("/console/nope.js", "text/plain; charset=utf-8"),
        ] {
            let res = serve(&Method::GET, path);
            assert_eq!(header(&res, "content-type"), kind, "{path}");
            assert_eq!(header(&res, "content-security-policy"), CONTENT_SECURITY_POLICY, "{path}");
            assert_eq!(header(&res, "x-content-type-options"), "nosniff");
            assert_eq!(header(&res, "referrer-policy"), "no-referrer");
            assert_eq!(header(&res, "cache-control"), "no-store");
        }
        assert_eq!(serve(&Method::GET, "/console/nope.js").status(), StatusCode::NOT_FOUND);
        assert_eq!(serve(&Method::POST, "/console").status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(serve(&Method::HEAD, "/console/app.css").status(), StatusCode::OK);
    }

    #[test]
    fn the_policy_allows_nothing_inline() {
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'none';"));
        assert!(CONTENT_SECURITY_POLICY.contains("frame-ancestors 'none'"));
    }

    #[test]
    fn the_page_has_no_inline_code_and_the_script_no_html_sinks() {
        let html = std::str::from_utf8(file("/console").map(|f| f.1).unwrap_or_default()).unwrap_or_default();
        assert!(html.contains(r#"<script type="module" src="/console/app.js"></script>"#), "{html}");
        assert!(html.contains(r#"<link rel="stylesheet" href="/console/app.css">"#));
        // Inline scripts, styles and event-handler attributes would be refused by the policy anyway.
        assert_eq!(html.matches("<script").count(), 1, "one external script, no inline one");
        assert!(!html.contains("<style") && !html.contains("style="), "{html}");
        assert_eq!(handler_attribute(html), None, "no event-handler attribute");
        // Submitted without the script, the sign-in form sends nothing in a URL (and the field is unnamed).
        assert!(html.contains(r#"<form id="login" class="card login" method="post""#), "{html}");
        assert!(html.contains(r#"<input id="token" type="password" required>"#), "{html}");
        let js = std::str::from_utf8(file("/console/app.js").map(|f| f.1).unwrap_or_default()).unwrap_or_default();
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"] {
            assert!(!js.contains(sink), "app.js uses {sink}");
        }
        assert!(!js.contains("localStorage") && !js.contains("document.cookie"), "the token stays in sessionStorage");
    }
}
