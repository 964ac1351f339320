//! The checks of an upgrade request that need no I/O: origin, subprotocol, token.

use hyper::header::{HeaderMap, HeaderValue, COOKIE, HOST, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use hyper::Uri;
use shared::SUBPROTOCOL;

/// Whether a browser's `Origin` may connect. Requests without one (non-browser clients) may.
/// With no allow-list, the origin's host must be the `Host` the request was sent to.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.to_ascii_lowercase();
    if allowed.is_empty() {
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin.split_once("://").map(|(_, host)| host);
        return matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h));
    }
    allowed
        .iter()
        .any(|pattern| origin_matches(&origin, &pattern.to_ascii_lowercase()))
}

/// `https://*.example.com` matches any subdomain of example.com over https, not example.com.
fn origin_matches(origin: &str, pattern: &str) -> bool {
    match pattern.split_once("://*.") {
        None => origin == pattern,
        Some((scheme, domain)) => origin
            .strip_prefix(scheme)
            .and_then(|rest| rest.strip_prefix("://"))
            .and_then(|host| host.strip_suffix(domain))
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.') && !sub.starts_with('.')),
    }
}

/// The subprotocol to select: `bgw.v1` when the client offers it.
pub fn subprotocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let offered = headers.get_all(SEC_WEBSOCKET_PROTOCOL);
    offered
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
        .then(|| HeaderValue::from_static(SUBPROTOCOL))
}

/// The token of the request: query parameter `token`, else the named cookie.
pub fn token(uri: &Uri, headers: &HeaderMap, cookie_name: &str) -> Option<String> {
    let from_query = uri.query().and_then(|query| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "token")
            .map(|(_, value)| value.into_owned())
    });
    from_query.or_else(|| {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == cookie_name)
            .map(|(_, value)| value.trim_matches('"').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn origins() {
        let none: &[String] = &[];
        assert!(origin_allowed(&headers(&[("host", "gw:8080")]), none));
        assert!(origin_allowed(
            &headers(&[("host", "gw:8080"), ("origin", "http://gw:8080")]),
            none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "gw:8080"), ("origin", "http://evil:8080")]),
            none
        ));
        let list = [
            "https://app.example.com".to_string(),
            "https://*.example.org".to_string(),
        ];
        assert!(origin_allowed(
            &headers(&[("origin", "https://app.example.com")]),
            &list
        ));
        assert!(origin_allowed(
            &headers(&[("origin", "https://a.example.org")]),
            &list
        ));
        assert!(origin_allowed(
            &headers(&[("origin", "https://a.b.example.org")]),
            &list
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "https://example.org")]),
            &list
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "https://evilexample.org")]),
            &list
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "http://a.example.org")]),
            &list
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "https://app.example.com.evil")]),
            &list
        ));
        assert!(!origin_allowed(&headers(&[("origin", "null")]), &list));
    }

    #[test]
    fn tokens() {
        let uri: Uri = "/ws?a=1&token=x%2By".parse().unwrap();
        assert_eq!(
            token(&uri, &HeaderMap::new(), "bgw_token").as_deref(),
            Some("x+y")
        );
        let cookies = headers(&[("cookie", "a=b; bgw_token=abc; c=d")]);
        assert_eq!(
            token(&"/ws".parse().unwrap(), &cookies, "bgw_token").as_deref(),
            Some("abc")
        );
        assert_eq!(
            token(&"/ws".parse().unwrap(), &HeaderMap::new(), "bgw_token"),
            None
        );
    }

    #[test]
    fn subprotocols() {
        assert!(subprotocol(&headers(&[("sec-websocket-protocol", "x, bgw.v1")])).is_some());
        assert!(subprotocol(&headers(&[("sec-websocket-protocol", "x")])).is_none());
    }
}
