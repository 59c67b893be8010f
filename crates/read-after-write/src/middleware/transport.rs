//! How tokens travel: read from `Cookie` headers or the token header, written
//! as an appended `Set-Cookie` and the token header.

use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::backend::Backend;
use crate::config::Shared;

/// Calls `each` with every token candidate, header first, then every cookie
/// named `cookie_name` across all `Cookie` headers (HTTP/2 sends one header
/// per cookie), until `each` returns true. Returns whether any candidate was
/// found.
///
/// Does not bound the number of candidates: that is the caller's MAC budget
/// (see [`MAX_MACS_PER_REQUEST`](super::MAX_MACS_PER_REQUEST)), which junk
/// cannot spend. One pass over the header bytes, no allocation: the work is
/// linear in the headers' size, which the HTTP server already bounds.
pub(crate) fn for_each_candidate(
    headers: &HeaderMap,
    cookie_name: &str,
    token_header: Option<&HeaderName>,
    mut each: impl FnMut(&str) -> bool,
) -> bool {
    let mut found = false;
    if let Some(name) = token_header {
        for value in headers.get_all(name) {
            // Not visible ASCII: not a token of ours; skip, never fail.
            let Ok(text) = value.to_str() else { continue };
            found = true;
            if each(text.trim()) {
                return true;
            }
        }
    }
    for value in headers.get_all(COOKIE) {
        // Parsed by hand, in one pass over the bytes with no allocation:
        // `cookie::Cookie::split_parse` cost more than verifying the token.
        // Pairs split on `;`, names and values trimmed, a quoted value
        // unquoted; only our cookie's value needs to be text, so a header
        // with other non-ASCII cookies still yields ours.
        for pair in value.as_bytes().split(|&b| b == b';') {
            let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != cookie_name.as_bytes() {
                continue;
            }
            let raw = pair[eq + 1..].trim_ascii();
            let raw = raw
                .strip_prefix(b"\"")
                .and_then(|inner| inner.strip_suffix(b"\""))
                .unwrap_or(raw);
            let Ok(text) = std::str::from_utf8(raw) else {
                continue;
            };
            found = true;
            if each(text) {
                return true;
            }
        }
    }
    found
}

/// Appends the `Set-Cookie` for `token` (keeping every other cookie the
/// handler set) and sets the token header.
pub(crate) fn attach_token<B: Backend>(headers: &mut HeaderMap, shared: &Shared<B>, token: String) {
    let (prefix, suffix) = &shared.set_cookie;
    let mut text = String::with_capacity(prefix.len() + token.len() + suffix.len());
    text.push_str(prefix);
    text.push_str(&token);
    text.push_str(suffix);
    match HeaderValue::try_from(text) {
        Ok(value) => {
            headers.append(SET_COOKIE, value);
        }
        Err(_) => tracing::warn!(
            cookie = %shared.cookie_name,
            "affinity cookie is not a valid header value (check the cookie name and domain); not set"
        ),
    }
    if let Some(name) = &shared.token_header {
        // The token itself becomes the header's bytes: no copy.
        match HeaderValue::try_from(token) {
            Ok(value) => {
                headers.insert(name.clone(), value);
            }
            Err(_) => {
                tracing::warn!("affinity token is not a valid header value; not sent as a header")
            }
        }
    }
}
