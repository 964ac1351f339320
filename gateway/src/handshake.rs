//! The checks of an upgrade request that need no I/O: origin, subprotocol, token.

use hyper::header::{HeaderMap, HeaderValue, COOKIE, HOST, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use hyper::Uri;
use ipnet::IpNet;
use shared::SUBPROTOCOL;
use std::net::IpAddr;

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

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case the
/// last address of `X-Forwarded-For` that is not itself a trusted proxy (proxies append, so the
/// addresses before it are the client's own claims).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let forwarded = headers(&[("x-forwarded-for", "1.2.3.4, 198.51.100.7, 10.0.0.2")]);
        assert_eq!(
            client_address(proxy, &forwarded, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_address(stranger, &forwarded, &trusted),
            stranger,
            "only proxies are believed"
        );
        assert_eq!(client_address(proxy, &HeaderMap::new(), &trusted), proxy);
        assert_eq!(client_address(proxy, &forwarded, &[]), proxy);
    }

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
    fn origin_edges() {
        let none: &[String] = &[];
        // Hosts compare without regard to case, ports included.
        assert!(origin_allowed(
            &headers(&[("host", "GW:8080"), ("origin", "http://gw:8080")]),
            none
        ));
        assert!(!origin_allowed(
            &headers(&[("host", "gw:8080"), ("origin", "http://gw:8081")]),
            none
        ));
        assert!(!origin_allowed(&headers(&[("origin", "http://gw")]), none));
        let list = ["HTTPS://*.Example.org".to_string()];
        assert!(origin_allowed(
            &headers(&[("origin", "https://A.example.ORG")]),
            &list
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "https://a.example.org:8443")]),
            &list
        ));
        assert!(!origin_allowed(
            &headers(&[("origin", "https://.example.org")]),
            &list
        ));
        // Bytes that are not visible ASCII: refused, never a panic.
        let mut odd = HeaderMap::new();
        odd.insert(
            ORIGIN,
            HeaderValue::from_bytes(b"https://\xe9.example.org").unwrap(),
        );
        odd.insert(HOST, HeaderValue::from_bytes(b"\xe9.example.org").unwrap());
        assert!(!origin_allowed(&odd, none));
        assert!(!origin_allowed(&odd, &list));
    }

    #[test]
    fn token_edges() {
        let ws: Uri = "/ws".parse().unwrap();
        // A cookie value keeps its `=` (base64 padding); the name must match exactly.
        let cookies = headers(&[("cookie", "xbgw_token=no; bgw_token=ab==")]);
        assert_eq!(token(&ws, &cookies, "bgw_token").as_deref(), Some("ab=="));
        // The query wins over the cookie.
        let uri: Uri = "/ws?token=q".parse().unwrap();
        assert_eq!(token(&uri, &cookies, "bgw_token").as_deref(), Some("q"));
        // Cookies may come in several headers.
        let mut split = headers(&[("cookie", "a=b")]);
        split.append(COOKIE, HeaderValue::from_static("bgw_token=\"c\""));
        assert_eq!(token(&ws, &split, "bgw_token").as_deref(), Some("c"));
        let mut odd = HeaderMap::new();
        odd.insert(COOKIE, HeaderValue::from_bytes(b"bgw_token=\xff").unwrap());
        assert_eq!(token(&ws, &odd, "bgw_token"), None);
    }

    #[test]
    fn subprotocols() {
        assert!(subprotocol(&headers(&[("sec-websocket-protocol", "x, bgw.v1")])).is_some());
        assert!(subprotocol(&headers(&[("sec-websocket-protocol", "x")])).is_none());
    }
}
