//! Names of volumes (the top-level directories of the filesystem) and of services.
//!
//! Both end up in file paths of sinks and in topic templates, so they are kept to a portable
//! alphabet rather than "anything a directory may be called".

use std::fmt;

/// Longest volume name accepted.
pub const VOLUME_NAME_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeNameError {
    Empty,
    TooLong(usize),
    DotPrefix,
    BadChar(char),
}

impl fmt::Display for VolumeNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "it is empty"),
            Self::TooLong(n) => write!(f, "it is {n} bytes long; at most {VOLUME_NAME_MAX} are allowed"),
            Self::DotPrefix => write!(f, "it must not start with '.' (no '.', '..' or hidden names)"),
            Self::BadChar(c) => {
                write!(f, "it contains {c:?}; only ASCII letters, digits, '.', '_' and '-' are allowed")
            }
        }
    }
}

impl std::error::Error for VolumeNameError {}

/// Checks a volume or service name: 1 to 128 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_volume_name(name: &str) -> Result<(), VolumeNameError> {
    if name.is_empty() {
        return Err(VolumeNameError::Empty);
    }
    if name.len() > VOLUME_NAME_MAX {
        return Err(VolumeNameError::TooLong(name.len()));
    }
    if name.starts_with('.') {
        return Err(VolumeNameError::DotPrefix);
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(VolumeNameError::BadChar(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["app", "web-1", "a.b_c", "X9"] {
            assert_eq!(validate_volume_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_tricks() {
        assert_eq!(validate_volume_name(""), Err(VolumeNameError::Empty));
        assert_eq!(validate_volume_name(".."), Err(VolumeNameError::DotPrefix));
        assert_eq!(validate_volume_name(".hidden"), Err(VolumeNameError::DotPrefix));
        assert_eq!(validate_volume_name("a/b"), Err(VolumeNameError::BadChar('/')));
        assert_eq!(validate_volume_name("a\0b"), Err(VolumeNameError::BadChar('\0')));
        assert_eq!(validate_volume_name("a b"), Err(VolumeNameError::BadChar(' ')));
        let long = "a".repeat(VOLUME_NAME_MAX + 1);
        assert_eq!(validate_volume_name(&long), Err(VolumeNameError::TooLong(129)));
        assert!(validate_volume_name(&"a".repeat(VOLUME_NAME_MAX)).is_ok());
    }
}
