//! The live page at `GET /`: one HTML file, its script, its style sheet
//! and its icon, all inside the binary (no CDN: the page works offline and
//! asks nothing of any other host). The script draws its charts itself, in
//! SVG, from the JSON API (see `page.js`).
//!
//! Names in the page come from the network; the script only ever sets them
//! as text, and [`CONTENT_SECURITY_POLICY`] forbids inline script and every
//! other origin as a second wall.

use warp::{
    Filter,
    http::{HeaderValue, Response, header},
};

/// Sent with every answer: scripts, styles, images and fetches from the
/// agent itself only, no inline script, no frames, no forms.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The page's files: path, media type, contents.
const ASSETS: [(&str, &str, &str); 4] = [
    ("", "text/html; charset=utf-8", include_str!("index.html")),
    (
        "page.js",
        "text/javascript; charset=utf-8",
        include_str!("page.js"),
    ),
    (
        "page.css",
        "text/css; charset=utf-8",
        include_str!("page.css"),
    ),
    ("favicon.svg", "image/svg+xml", include_str!("favicon.svg")),
];

fn asset(media_type: &'static str, body: &'static str) -> Response<&'static str> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(media_type));
    // Asked again on each load, so that an upgraded agent's page is never
    // mixed with an old script.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`, `/page.js`, `/page.css`, `/favicon.svg`.
pub fn routes() -> impl Filter<Extract = (Response<&'static str>,), Error = warp::Rejection>
+ Clone
+ Send
+ Sync
+ 'static {
    warp::get()
        .and(warp::path::tail())
        .and_then(|tail: warp::path::Tail| async move {
            ASSETS
                .iter()
                .find(|(path, _, _)| *path == tail.as_str())
                .map(|(_, media_type, body)| asset(media_type, body))
                .ok_or_else(warp::reject::not_found)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page names only its own files and the API, by relative paths:
    /// nothing another host could serve.
    #[test]
    fn the_page_asks_for_its_own_files_only() {
        for (path, _, body) in ASSETS {
            let outside = body.replace("http://www.w3.org/2000/svg", "");
            for absolute in ["://", "\"//", "'//", "url("] {
                assert!(!outside.contains(absolute), "{path:?} has {absolute}");
            }
        }
        // HTML is case-blind, and attributes are split by any white space.
        let html = ASSETS[0].2.to_ascii_lowercase();
        for tag in html.split('<').filter(|tag| tag.starts_with("script")) {
            let attributes = tag.split('>').next().unwrap_or_default();
            assert!(
                attributes.contains("src="),
                "no inline script: <{attributes}>"
            );
        }
        let words = || html.split(|c: char| c.is_ascii_whitespace() || c == '<');
        assert!(!words().any(|w| w.starts_with("style=")), "no inline style");
        let handler = words().find(|word| {
            word.strip_prefix("on")
                .and_then(|rest| rest.split_once('='))
                .is_some_and(|(name, _)| name.chars().all(|c| c.is_ascii_lowercase()))
        });
        assert!(handler.is_none(), "no inline handlers: {handler:?}");
        assert!(!html.contains("javascript:"), "no script in links");
        let script = ASSETS[1].2;
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!script.contains(sink), "page.js uses {sink}");
        }
    }
}
