//! A stand-in for an app instance on a later release whose token format is
//! newer than this one's, for the `rolling-format-upgrade` drill.
//!
//! Every token format from version 3 on begins with the same head (version,
//! key id, user tag, expiry); what follows is the version's own
//! (see [`read_after_write::token`]). The stand-in runs this release behind
//! a middleware that re-labels the tokens it issues (the `Set-Cookie` and
//! the token header) as version [`LATER`], keeping the head and appending a
//! field, and re-labels such tokens back on the requests it serves: it
//! reads and writes the later format, as the later release would. An
//! instance of this release meeting its tokens can read no more of them
//! than it could of a real later release's: the head.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue};
use read_after_write::token::TOKEN_VERSION;

/// The format version the stand-in's tokens claim.
pub const LATER: u8 = TOKEN_VERSION + 1;

/// The field the later format appends (the stand-in's marker).
const APPENDED: u8 = 0xA5;

/// The affinity cookie's name (the layer's default, as the apps use it).
const COOKIE_NAME: &str = "primary_affinity";

/// The token header (the layer's default).
static TOKEN_HEADER: HeaderName = HeaderName::from_static("x-primary-affinity");

/// A token of this release as the later release writes it; `None` for
/// anything else.
pub fn to_later(token: &str) -> Option<String> {
    let mut raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    if raw.first() != Some(&TOKEN_VERSION) {
        return None;
    }
    raw[0] = LATER;
    raw.push(APPENDED);
    Some(URL_SAFE_NO_PAD.encode(raw))
}

/// A token of the later release as this release's; `None` for anything
/// else.
pub fn from_later(token: &str) -> Option<String> {
    let mut raw = URL_SAFE_NO_PAD.decode(token).ok()?;
    if raw.first() != Some(&LATER) || raw.last() != Some(&APPENDED) {
        return None;
    }
    raw.pop();
    raw[0] = TOKEN_VERSION;
    Some(URL_SAFE_NO_PAD.encode(raw))
}

/// A `Cookie` header with every affinity cookie passed through `relabel`
/// (left as it was where that gives `None`), the other cookies untouched.
fn cookie_header(value: &str, relabel: fn(&str) -> Option<String>) -> String {
    value
        .split(';')
        .map(|pair| {
            let pair = pair.trim();
            pair.strip_prefix(COOKIE_NAME)
                .and_then(|rest| rest.strip_prefix('='))
                .and_then(relabel)
                .map_or_else(|| pair.to_owned(), |token| format!("{COOKIE_NAME}={token}"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A `Set-Cookie` header with the affinity cookie's value passed through
/// `relabel`, its attributes kept.
fn set_cookie_header(value: &str, relabel: fn(&str) -> Option<String>) -> String {
    let Some(rest) = value
        .strip_prefix(COOKIE_NAME)
        .and_then(|rest| rest.strip_prefix('='))
    else {
        return value.to_owned();
    };
    let (token, attributes) = rest.split_once(';').unwrap_or((rest, ""));
    match relabel(token) {
        Some(token) if attributes.is_empty() => format!("{COOKIE_NAME}={token}"),
        Some(token) => format!("{COOKIE_NAME}={token};{attributes}"),
        None => value.to_owned(),
    }
}

/// Replaces every value of `name` in `headers` with `rewrite` of it (a
/// value that is not text, or whose rewrite is not a valid value, stays).
fn rewrite(headers: &mut HeaderMap, name: &HeaderName, rewrite: impl Fn(&str) -> String) {
    let values: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
    if values.is_empty() {
        return;
    }
    headers.remove(name);
    for value in values {
        let rewritten = value
            .to_str()
            .ok()
            .and_then(|text| HeaderValue::from_str(&rewrite(text)).ok())
            .unwrap_or(value);
        headers.append(name.clone(), rewritten);
    }
}

/// The middleware: the later release's tokens in, read as this release's;
/// every token out in the later format.
pub async fn later_release(mut request: Request, next: Next) -> Response {
    let headers = request.headers_mut();
    rewrite(headers, &COOKIE, |value| cookie_header(value, from_later));
    rewrite(headers, &TOKEN_HEADER, |value| {
        from_later(value.trim()).unwrap_or_else(|| value.to_owned())
    });
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    rewrite(headers, &SET_COOKIE, |value| {
        set_cookie_header(value, to_later)
    });
    rewrite(headers, &TOKEN_HEADER, |value| {
        to_later(value).unwrap_or_else(|| value.to_owned())
    });
    response
}

#[cfg(test)]
mod tests {
    use read_after_write::{
        AffinityToken, KeySet, Lsn, SigningKey, TokenError, UserId, WritePosition,
    };

    use super::*;

    #[test]
    fn tokens_go_to_the_later_format_and_back_and_nothing_else_moves() {
        let keys = KeySet::new(SigningKey::from_bytes(&[5; 32]).unwrap());
        let user = UserId::from(9u64);
        let position = WritePosition::new(Lsn::new(0x300), 1, 7);
        let token = AffinityToken::new(user.clone(), position, 1_000).sign(COOKIE_NAME, &keys);
        let later = to_later(&token).unwrap();
        // This release reads no more of it than of a real later release's.
        assert_eq!(
            AffinityToken::verify(&later, COOKIE_NAME, &keys, 0, &user),
            Err(TokenError::WrongVersion)
        );
        assert_eq!(from_later(&later).as_deref(), Some(token.as_str()));
        assert_eq!(to_later(&later), None, "already later");
        assert_eq!(from_later(&token), None, "not later");

        let header = format!("a=1; {COOKIE_NAME}={token}; b=2");
        let relabelled = cookie_header(&header, to_later);
        assert_eq!(relabelled, format!("a=1; {COOKIE_NAME}={later}; b=2"));
        assert_eq!(cookie_header(&relabelled, from_later), header);
        let set = format!("{COOKIE_NAME}={token}; Path=/; HttpOnly");
        assert_eq!(
            set_cookie_header(&set, to_later),
            format!("{COOKIE_NAME}={later}; Path=/; HttpOnly")
        );
        assert_eq!(
            set_cookie_header("other=1; Path=/", to_later),
            "other=1; Path=/"
        );
    }
}
