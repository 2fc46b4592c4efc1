//! Names: of volumes (the top-level directories of the filesystem), services, modules, sinks.
//!
//! They end up in file paths of sinks and in Kafka topics, so they keep to one portable alphabet
//! (Kafka's topic characters: ASCII letters, digits, '.', '_', '-'), rather than "anything a
//! directory may be called". This is the one place that alphabet is written.

use std::fmt;

/// Longest name accepted.
pub const NAME_MAX: usize = 128;

/// Whether `c` may stand in a name.
pub fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong(usize),
    DotPrefix,
    BadChar(char),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "it is empty"),
            Self::TooLong(n) => write!(f, "it is {n} bytes long; at most {NAME_MAX} are allowed"),
            Self::DotPrefix => write!(f, "it must not start with '.' (no '.', '..' or hidden names)"),
            Self::BadChar(c) => {
                write!(f, "it contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed")
            }
        }
    }
}

impl std::error::Error for NameError {}

/// A checked name: 1 to 128 of `[A-Za-z0-9._-]`, not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > NAME_MAX {
            return Err(NameError::TooLong(name.len()));
        }
        if name.starts_with('.') {
            return Err(NameError::DotPrefix);
        }
        match name.chars().find(|&c| !is_name_char(c)) {
            Some(c) => Err(NameError::BadChar(c)),
            None => Ok(Self(name.to_string())),
        }
    }

    /// `text` made into a name: other characters become `_`, leading dots and what is past
    /// [`NAME_MAX`] go; `None` when nothing is left.
    pub fn sanitize(text: &str) -> Option<Self> {
        let s: String = text.trim().chars().map(|c| if is_name_char(c) { c } else { '_' }).take(NAME_MAX).collect();
        let s = s.trim_start_matches('.');
        (!s.is_empty()).then(|| Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["app", "web-1", "a.b_c", "X9"] {
            assert_eq!(Name::parse(ok).map(|n| n.into_string()), Ok(ok.to_string()), "{ok}");
        }
    }

    #[test]
    fn rejects_tricks() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert_eq!(Name::parse(".."), Err(NameError::DotPrefix));
        assert_eq!(Name::parse(".hidden"), Err(NameError::DotPrefix));
        assert_eq!(Name::parse("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(Name::parse("a\0b"), Err(NameError::BadChar('\0')));
        assert_eq!(Name::parse("a b"), Err(NameError::BadChar(' ')));
        let long = "a".repeat(NAME_MAX + 1);
        assert_eq!(Name::parse(&long), Err(NameError::TooLong(129)));
        assert!(Name::parse(&"a".repeat(NAME_MAX)).is_ok());
    }

    #[test]
    fn sanitizing_keeps_the_alphabet() {
        assert_eq!(Name::sanitize(" web shop/é ").map(Name::into_string), Some("web_shop__".into()));
        assert_eq!(Name::sanitize("..x").map(Name::into_string), Some("x".into()));
        assert_eq!(Name::sanitize("..."), None);
        assert_eq!(Name::sanitize(&"a".repeat(300)).map(|n| n.as_str().len()), Some(NAME_MAX));
    }
}
