//! Channel names and the patterns of token claims.

/// The longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// A channel name is 1 to 128 bytes of `A-Z a-z 0-9 . _ - : @ /`.
pub fn valid_channel(name: &str) -> bool {
    (1..=MAX_CHANNEL_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:@/".contains(&b))
}

/// A channel pattern of a token claim: an exact name, or a prefix followed by `*` that matches
/// any suffix (`user.42.*`, and `*` alone for every channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelPattern {
    Exact(String),
    Prefix(String),
}

impl ChannelPattern {
    pub fn new(pattern: &str) -> Self {
        match pattern.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_owned()),
            None => Self::Exact(pattern.to_owned()),
        }
    }

    pub fn matches(&self, channel: &str) -> bool {
        match self {
            Self::Exact(name) => name == channel,
            Self::Prefix(prefix) => channel.starts_with(prefix.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_channel("news"));
        assert!(valid_channel("user.42/inbox:a@b_c-d"));
        assert!(valid_channel(&"a".repeat(128)));
        assert!(!valid_channel(&"a".repeat(129)));
        assert!(!valid_channel(""));
        assert!(!valid_channel("new s"));
        assert!(!valid_channel("né"));
        assert!(!valid_channel("a*"));
    }

    #[test]
    fn patterns() {
        assert!(ChannelPattern::new("news").matches("news"));
        assert!(!ChannelPattern::new("news").matches("news2"));
        assert!(ChannelPattern::new("user.42.*").matches("user.42.inbox"));
        assert!(ChannelPattern::new("user.42.*").matches("user.42."));
        assert!(!ChannelPattern::new("user.42.*").matches("user.43.inbox"));
        assert!(ChannelPattern::new("*").matches("anything"));
    }
}
