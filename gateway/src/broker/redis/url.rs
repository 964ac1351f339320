//! The text of a Redis URL: cut at its separators, one node's URL out of a multi-host one, and
//! the URL with its password hidden.

/// `host:port`, an IPv6 host in brackets.
pub(super) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The URL of one node of a multi-host URL.
pub(super) fn node_url(
    scheme: &str,
    userinfo: Option<&str>,
    host: &str,
    default_port: u16,
    db: Option<&str>,
) -> String {
    let has_port = if host.starts_with('[') {
        host.contains("]:")
    } else {
        host.contains(':')
    };
    let host = if has_port {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    };
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let db = db.map(|db| format!("/{db}")).unwrap_or_default();
    format!("{scheme}://{userinfo}{host}{db}")
}

/// A URL cut at its separators, without decoding anything.
pub(super) struct Parts<'a> {
    pub(super) scheme: &'a str,
    pub(super) userinfo: Option<&'a str>,
    pub(super) hosts: Vec<&'a str>,
    pub(super) path: &'a str,
}

pub(super) fn split(url: &str) -> Result<Parts<'_>, &'static str> {
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
    if hosts.is_empty() {
        return Err("no host");
    }
    Ok(Parts {
        scheme,
        userinfo,
        hosts,
        path,
    })
}

/// The URL with its password (or a lone userinfo, which may be one) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: whatever follows a colon may be a password.
        return match url.split_once(':') {
            Some((before, _)) => format!("{before}:***"),
            None => url.to_owned(),
        };
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (rest, None),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => format!("***@{hosts}"),
        },
        // Hosts only: a "port" that is not a number is likely a password without its `@`.
        None => authority
            .split(',')
            .map(|host| match host.rsplit_once(':') {
                Some((name, port))
                    if !host.ends_with(']') && !port.chars().all(|c| c.is_ascii_digit()) =>
                {
                    format!("{name}:***")
                }
                _ => host.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(","),
    };
    match path {
        Some(path) => format!("{scheme}://{authority}/{path}"),
        None => format!("{scheme}://{authority}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:hunter2@10.0.0.1:6379/2"),
            "redis://user:***@10.0.0.1:6379/2"
        );
        assert_eq!(redact("rediss://:hunter2@h"), "rediss://:***@h");
        assert_eq!(redact("redis://hunter2@h:1"), "redis://***@h:1");
        assert_eq!(
            redact("redis+sentinel://u:p@a:1,b:2/mymaster"),
            "redis+sentinel://u:***@a:1,b:2/mymaster"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn node_urls() {
        assert_eq!(
            node_url("rediss", Some("u:p"), "h", 26379, None),
            "rediss://u:p@h:26379"
        );
        assert_eq!(
            node_url("redis", None, "h:1", 6379, Some("2")),
            "redis://h:1/2"
        );
        assert_eq!(
            node_url("redis", None, "[::1]:7", 6379, None),
            "redis://[::1]:7"
        );
        assert_eq!(host_port("::1", 7), "[::1]:7");
    }
}
