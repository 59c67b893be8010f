//! How tokens travel: read from `Cookie` headers or the token header, written
//! as an appended `Set-Cookie` and the token header.

use cookie::{Cookie, SameSite};
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::{ConfigError, Shared};
use crate::backend::Backend;

/// The longest token lifetime honoured: 400 days, the cap RFC 6265bis
/// (§5.5) tells browsers to apply to `Max-Age` and `Expires`. Longer TTLs,
/// `Duration::MAX` included, are clamped to it.
pub(crate) const MAX_TTL_SECONDS: u64 = 400 * 24 * 60 * 60;

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
}

/// The `Set-Cookie` text around the token, `("name=", "; HttpOnly; ...")`,
/// rendered once per configuration by the `cookie` crate so the per-write
/// path only concatenates.
pub(crate) fn set_cookie_template<B>(shared: &Shared<B>) -> (String, String) {
    const PLACEHOLDER: &str = "TOKEN";
    let mut cookie = Cookie::build((shared.cookie_name.as_str(), PLACEHOLDER))
        .http_only(true)
        .secure(shared.secure)
        .same_site(SameSite::Lax)
        .path("/")
        .max_age(cookie::time::Duration::seconds(ttl_seconds(shared)));
    if let Some(domain) = &shared.domain {
        cookie = cookie.domain(domain.as_str());
    }
    let rendered = cookie.build().to_string();
    let prefix = format!("{}=", shared.cookie_name);
    match rendered
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_prefix(PLACEHOLDER))
    {
        Some(suffix) => (prefix, suffix.to_owned()),
        // The cookie crate quoted or escaped the name: fall back to its
        // rendering with the placeholder kept out of the value.
        None => (
            prefix,
            rendered
                .split_once(';')
                .map_or(String::new(), |(_, rest)| format!(";{rest}")),
        ),
    }
}

/// The token lifetime in whole seconds, rounded up, as `Max-Age` uses it:
/// at least 1, at most [`MAX_TTL_SECONDS`], whatever was configured.
pub(crate) fn ttl_seconds<B>(shared: &Shared<B>) -> i64 {
    let ttl = match shared.mode {
        super::Mode::Position => shared.ttl,
        super::Mode::TimeWindow(window) => window,
    };
    let seconds = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0))
        .clamp(1, MAX_TTL_SECONDS);
    // 400 days fits an i64 many times over; the fallback is never taken.
    i64::try_from(seconds).unwrap_or(1)
}

/// Checks a configured cookie name: an RFC 6265 `token` (RFC 9110 §5.6.2),
/// one or more visible ASCII characters other than the separators.
pub(crate) fn check_cookie_name(name: &str) -> Result<(), ConfigError> {
    const SEPARATORS: &[u8] = b"()<>@,;:\\\"/[]?={} \t";
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !SEPARATORS.contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ConfigError::InvalidCookieName {
            name: name.to_owned(),
        })
    }
}

/// Checks a configured cookie domain: a host name of letters, digits, `-`
/// and `.`, with an optional leading `.`, labels of 1 to 63 characters that
/// neither start nor end with `-`, at most 253 characters in all.
pub(crate) fn check_domain(domain: &str) -> Result<(), ConfigError> {
    let host = domain.strip_prefix('.').unwrap_or(domain);
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(ConfigError::InvalidDomain {
            domain: domain.to_owned(),
        })
    }
}
