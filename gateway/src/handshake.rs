//! The checks of an upgrade request that need no I/O: origin, subprotocol, token, and who the
//! client is behind a proxy.

use std::fmt;
use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderValue, COOKIE, HOST, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use hyper::http::uri::Authority;
use hyper::Uri;
use ipnet::IpNet;
use shared::SUBPROTOCOL;

/// Why a browser's `Origin` was refused: the reason of the log line, and of the 403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginRefusal {
    /// Not `scheme://host[:port]` in visible ASCII: `null` (sandboxed pages, `file:` URLs) is
    /// one, and so is anything with a path, user or empty port.
    Malformed,
    /// An allow-list is configured, and the origin is not on it.
    NotAllowed,
    /// No allow-list: the origin must name the host the request was sent to, and does not.
    OtherHost,
}

impl fmt::Display for OriginRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OriginRefusal::Malformed => "the Origin is not scheme://host[:port]",
            OriginRefusal::NotAllowed => "the Origin is not in --allowed-origins",
            OriginRefusal::OtherHost => {
                "no --allowed-origins, and the Origin is not the host the request was sent to"
            }
        })
    }
}

/// Whether a browser's `Origin` may connect. Requests without one (non-browser clients) may.
///
/// With an allow-list, the origin must match one of its entries. Without one, it must name the
/// host the request was sent to: the `Host` header, or the last `X-Forwarded-Host` when the
/// request comes from a trusted proxy (`trust_forwarded`), since a proxy may rewrite `Host`.
/// Only `http` and `https` origins compare with a host. Host names compare without regard to
/// case, and a missing port is the default port of the origin's scheme (80 for http, 443 for
/// https): `Origin: http://gw` matches `Host: gw` and `Host: gw:80`, never `Host: gw:8080`.
pub fn check_origin(
    headers: &HeaderMap,
    allowed: &[String],
    trust_forwarded: bool,
) -> Result<(), OriginRefusal> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .ok()
        .and_then(Origin::parse)
        .ok_or(OriginRefusal::Malformed)?;
    if !allowed.is_empty() {
        return allowed
            .iter()
            .any(|pattern| origin.matches(pattern))
            .then_some(())
            .ok_or(OriginRefusal::NotAllowed);
    }
    request_host(headers, trust_forwarded)
        .and_then(HostPort::parse)
        .is_some_and(|host| origin.is_host(&host))
        .then_some(())
        .ok_or(OriginRefusal::OtherHost)
}

/// The host the client sent the request to, as the origin check sees it: the last
/// `X-Forwarded-Host` entry when the request comes through a trusted proxy and carries one (the
/// one the proxy nearest to this node wrote), else `Host`.
pub fn request_host(headers: &HeaderMap, trust_forwarded: bool) -> Option<&str> {
    let forwarded = trust_forwarded
        .then(|| headers.get_all("x-forwarded-host").iter().next_back())
        .flatten();
    let value = forwarded.or_else(|| headers.get(HOST))?.to_str().ok()?;
    value.rsplit(',').next().map(str::trim)
}

/// A host and an optional port, the host lowercased (an IPv6 address keeps its brackets).
#[derive(Debug, PartialEq, Eq)]
struct HostPort {
    host: String,
    port: Option<u16>,
}

impl HostPort {
    /// `host[:port]`, and nothing else: no user, path, query or empty port.
    fn parse(value: &str) -> Option<Self> {
        if value.is_empty() || value.ends_with(':') || value.contains(['@', '/', '?', '#']) {
            return None;
        }
        let authority: Authority = value.parse().ok()?;
        let host = authority.host();
        // The port as written: `Authority` forgets one that is not a u16 (`gw:99999`).
        let port = match value.get(host.len()..)? {
            "" => None,
            rest => {
                let digits = rest.strip_prefix(':')?;
                digits.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
                Some(digits.parse().ok()?)
            }
        };
        (!host.is_empty()).then(|| Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// A serialized origin, `scheme://host[:port]`, as browsers send it.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    at: HostPort,
}

impl Origin {
    fn parse(value: &str) -> Option<Self> {
        let (scheme, authority) = value.split_once("://")?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        scheme_ok.then_some(())?;
        Some(Self {
            scheme: scheme.to_ascii_lowercase(),
            at: HostPort::parse(authority)?,
        })
    }

    /// The port, or the scheme's default: what two ports compare as.
    fn port_or_default(&self, port: Option<u16>) -> Option<u16> {
        port.or(match self.scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        })
    }

    /// Whether this origin names `host`, a `Host` header taken apart.
    fn is_host(&self, host: &HostPort) -> bool {
        matches!(self.scheme.as_str(), "http" | "https")
            && self.at.host == host.host
            && self.port_or_default(self.at.port) == self.port_or_default(host.port)
    }

    /// Whether this origin matches an entry of the allow-list: an exact origin, or
    /// `scheme://*.domain[:port]`, any subdomain of the domain (not the domain itself).
    fn matches(&self, pattern: &str) -> bool {
        let Some((scheme, authority)) = pattern.split_once("://") else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(&self.scheme) {
            return false;
        }
        let (wildcard, authority) = match authority.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, authority),
        };
        let Some(wanted) = HostPort::parse(authority) else {
            return false;
        };
        if self.port_or_default(self.at.port) != self.port_or_default(wanted.port) {
            return false;
        }
        if !wildcard {
            return self.at.host == wanted.host;
        }
        self.at
            .host
            .strip_suffix(&wanted.host)
            .and_then(|sub| sub.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.starts_with('.'))
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
    if !is_trusted_proxy(peer, trusted) {
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
        .find(|ip| !is_trusted_proxy(*ip, trusted))
        .unwrap_or(peer)
}

/// Whether `peer` is one of the `--trusted-proxies`, whose forwarding headers are believed.
pub fn is_trusted_proxy(peer: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&peer))
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

    /// `check_origin` on a request with these headers, from a peer that is not a proxy.
    fn allowed(pairs: &[(&'static str, &'static str)], list: &[&str]) -> bool {
        let list: Vec<String> = list.iter().map(ToString::to_string).collect();
        check_origin(&headers(pairs), &list, false).is_ok()
    }

    #[test]
    fn origins() {
        assert!(
            allowed(&[("host", "gw:8080")], &[]),
            "no Origin: not a browser"
        );
        assert!(allowed(
            &[("host", "gw:8080"), ("origin", "http://gw:8080")],
            &[]
        ));
        assert!(!allowed(
            &[("host", "gw:8080"), ("origin", "http://evil:8080")],
            &[]
        ));
        let list = ["https://app.example.com", "https://*.example.org"];
        assert!(allowed(&[("origin", "https://app.example.com")], &list));
        assert!(allowed(&[("origin", "https://a.example.org")], &list));
        assert!(allowed(&[("origin", "https://a.b.example.org")], &list));
        assert!(!allowed(&[("origin", "https://example.org")], &list));
        assert!(!allowed(&[("origin", "https://evilexample.org")], &list));
        assert!(!allowed(&[("origin", "http://a.example.org")], &list));
        assert!(!allowed(
            &[("origin", "https://app.example.com.evil")],
            &list
        ));
        assert!(!allowed(&[("origin", "null")], &list));
        // With a list, the request's own host is not enough.
        assert!(!allowed(&[("host", "gw"), ("origin", "http://gw")], &list));
    }

    #[test]
    fn default_ports_are_the_same_as_none() {
        // What a browser sends through a proxy on port 80 or 443, or on another port.
        for (origin, host) in [
            ("http://gw", "gw"),
            ("http://gw", "gw:80"),
            ("http://gw:80", "gw"),
            ("https://gw", "gw"),
            ("https://gw", "gw:443"),
            ("https://gw:443", "gw"),
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://[::1]:8080", "[::1]:8080"),
            ("http://[::1]", "[::1]:80"),
        ] {
            assert!(
                allowed(&[("origin", origin), ("host", host)], &[]),
                "{origin} {host}"
            );
        }
        for (origin, host) in [
            // The port that the old config dropped: a browser on :8080 behind nginx.
            ("http://127.0.0.1:8080", "127.0.0.1"),
            ("http://gw", "gw:8080"),
            ("http://gw:8080", "gw"),
            ("http://gw", "gw:443"),
            ("https://gw", "gw:80"),
            ("http://[::1]:8080", "[::1]:8081"),
            // Only http and https origins name a host; other schemes need the allow-list.
            ("ftp://gw", "gw"),
            ("chrome-extension://gw", "gw"),
        ] {
            assert!(
                !allowed(&[("origin", origin), ("host", host)], &[]),
                "{origin} {host}"
            );
        }
        // In the allow-list too.
        assert!(allowed(
            &[("origin", "https://a.example.org")],
            &["https://*.example.org:443"]
        ));
        assert!(allowed(
            &[("origin", "https://app.example.com:443")],
            &["https://app.example.com"]
        ));
        assert!(!allowed(
            &[("origin", "https://app.example.com:8443")],
            &["https://app.example.com"]
        ));
        assert!(allowed(
            &[("origin", "http://a.b:8080")],
            &["http://a.b:8080"]
        ));
    }

    #[test]
    fn forwarded_hosts_count_from_trusted_proxies_only() {
        let through_proxy = headers(&[
            ("host", "10.0.0.5:8080"),
            ("x-forwarded-host", "chat.example.com"),
            ("origin", "https://chat.example.com"),
        ]);
        assert_eq!(check_origin(&through_proxy, &[], true), Ok(()));
        assert_eq!(
            check_origin(&through_proxy, &[], false),
            Err(OriginRefusal::OtherHost),
            "anyone can send X-Forwarded-Host"
        );
        // A client's own X-Forwarded-Host is not believed either: the Host decides.
        let forged = headers(&[
            ("host", "gw:8080"),
            ("x-forwarded-host", "evil.example"),
            ("origin", "http://gw:8080"),
        ]);
        assert_eq!(check_origin(&forged, &[], false), Ok(()));
        // Several entries: the last is the one the proxy nearest to the node wrote.
        let mut chain = headers(&[
            ("host", "10.0.0.5:8080"),
            ("x-forwarded-host", "evil.example, gw.example"),
            ("origin", "https://gw.example"),
        ]);
        assert_eq!(check_origin(&chain, &[], true), Ok(()));
        chain.append("x-forwarded-host", HeaderValue::from_static("evil.example"));
        assert_eq!(
            check_origin(&chain, &[], true),
            Err(OriginRefusal::OtherHost)
        );
        assert_eq!(request_host(&chain, true), Some("evil.example"));
        assert_eq!(request_host(&chain, false), Some("10.0.0.5:8080"));
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
        // Hosts compare without regard to case, ports included.
        assert!(allowed(
            &[("host", "GW:8080"), ("origin", "http://gw:8080")],
            &[]
        ));
        assert!(!allowed(
            &[("host", "gw:8080"), ("origin", "http://gw:8081")],
            &[]
        ));
        // No Host to compare with.
        assert!(!allowed(&[("origin", "http://gw")], &[]));
        let list = ["HTTPS://*.Example.org"];
        assert!(allowed(&[("origin", "https://A.example.ORG")], &list));
        assert!(!allowed(&[("origin", "https://a.example.org:8443")], &list));
        assert!(!allowed(&[("origin", "https://.example.org")], &list));
        // Not an origin: refused as malformed, whatever the host.
        for origin in [
            "null",
            "gw:8080",
            "http://",
            "http://gw:8080/",
            "http://gw:8080/path",
            "http://user@gw:8080",
            "http://gw:",
            "http://gw:99999",
            "http://gw:80x",
            "http://gw:+80",
            "http://gw :80",
            "://gw",
            "1http://gw",
        ] {
            let pairs = [("host", "gw:8080"), ("origin", origin)];
            assert_eq!(
                check_origin(&headers(&pairs), &[], false),
                Err(OriginRefusal::Malformed),
                "{origin}"
            );
        }
        // A malformed Host or X-Forwarded-Host never matches.
        for host in ["", "gw:", "gw:8080/x", "u@gw:8080", "gw:8080, "] {
            let pairs = [("origin", "http://gw:8080"), ("x-forwarded-host", host)];
            let mut with_host = headers(&pairs);
            with_host.insert(HOST, HeaderValue::from_static("10.0.0.5"));
            assert_eq!(
                check_origin(&with_host, &[], true),
                Err(OriginRefusal::OtherHost),
                "{host:?}"
            );
        }
        // Bytes that are not visible ASCII: refused, never a panic.
        let mut odd = HeaderMap::new();
        odd.insert(
            ORIGIN,
            HeaderValue::from_bytes(b"https://\xe9.example.org").unwrap(),
        );
        odd.insert(HOST, HeaderValue::from_bytes(b"\xe9.example.org").unwrap());
        let list: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(
            check_origin(&odd, &[], false),
            Err(OriginRefusal::Malformed)
        );
        assert_eq!(
            check_origin(&odd, &list, false),
            Err(OriginRefusal::Malformed)
        );
        let mut odd_host = headers(&[("origin", "http://gw")]);
        odd_host.insert(HOST, HeaderValue::from_bytes(b"g\xe9w").unwrap());
        assert_eq!(
            check_origin(&odd_host, &[], false),
            Err(OriginRefusal::OtherHost)
        );
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
