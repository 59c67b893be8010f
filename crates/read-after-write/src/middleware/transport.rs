//! How tokens travel: read from `Cookie` headers or the token header, written
//! as an appended `Set-Cookie` and the token header.

use cookie::{Cookie, SameSite};
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::Shared;
use crate::backend::Backend;

/// At most this many candidate tokens are verified per request, so a request
/// stuffed with cookies cannot buy unbounded MAC work.
pub(crate) const MAX_CANDIDATES: usize = 4;

/// Calls `each` with every token candidate, header first, then every cookie
/// named `cookie_name` across all `Cookie` headers (HTTP/2 sends one header
/// per cookie), until `each` returns true or [`MAX_CANDIDATES`] were tried.
/// Returns whether any candidate was found.
pub(crate) fn for_each_candidate(
    headers: &HeaderMap,
    cookie_name: &str,
    token_header: Option<&HeaderName>,
    mut each: impl FnMut(&str) -> bool,
) -> bool {
    let mut tried = 0;
    if let Some(name) = token_header {
        for value in headers.get_all(name) {
            // Not visible ASCII: not a token of ours; skip, never fail.
            let Ok(text) = value.to_str() else { continue };
            tried += 1;
            if each(text.trim()) || tried >= MAX_CANDIDATES {
                return true;
            }
        }
    }
    for value in headers.get_all(COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        // Cheap pre-filter: most requests carry cookies, few carry ours.
        if !text.contains(cookie_name) {
            continue;
        }
        for cookie in Cookie::split_parse(text).flatten() {
            if cookie.name() != cookie_name {
                continue;
            }
            tried += 1;
            if each(cookie.value()) || tried >= MAX_CANDIDATES {
                return true;
            }
        }
    }
    tried > 0
}

/// Appends the `Set-Cookie` for `token` (keeping every other cookie the
/// handler set) and sets the token header.
pub(crate) fn attach_token<B: Backend>(headers: &mut HeaderMap, shared: &Shared<B>, token: String) {
    if let Some(name) = &shared.token_header {
        match HeaderValue::from_str(&token) {
            Ok(value) => {
                headers.insert(name.clone(), value);
            }
            Err(_) => {
                tracing::warn!("affinity token is not a valid header value; not sent as a header")
            }
        }
    }
    let mut cookie = Cookie::build((shared.cookie_name.as_str(), token))
        .http_only(true)
        .secure(shared.secure)
        .same_site(SameSite::Lax)
        .path("/")
        .max_age(cookie::time::Duration::seconds(ttl_seconds(shared)));
    if let Some(domain) = &shared.domain {
        cookie = cookie.domain(domain.as_str());
    }
    match HeaderValue::try_from(cookie.build().to_string()) {
        Ok(value) => {
            headers.append(SET_COOKIE, value);
        }
        Err(_) => tracing::warn!(
            cookie = %shared.cookie_name,
            "affinity cookie is not a valid header value (check the cookie name and domain); not set"
        ),
    }
}

/// The token lifetime in whole seconds, as `Max-Age` and expiry use it.
pub(crate) fn ttl_seconds<B: Backend>(shared: &Shared<B>) -> i64 {
    let ttl = match shared.mode {
        super::Mode::Position => shared.ttl,
        super::Mode::TimeWindow(window) => window,
    };
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}
