//! Names that cross the wire and end up in lookups or paths: partition
//! names, suite (definition) names, record file names. One strict charset
//! for all of them, so no name can carry a path separator, `..`, a hidden
//! file, an option-like leading dash, a control character or an escape.

/// The longest name accepted (a GPT partition name holds 36 characters).
pub const MAX_LEN: usize = 64;

/// The charset, as people read it in messages.
pub const CHARSET: &str = "[A-Za-z0-9_][A-Za-z0-9_.-]*, at most 64 characters";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nothing at all.
    #[error("empty name")]
    Empty,
    /// Longer than [`MAX_LEN`].
    #[error("name {0:?} is longer than 64 characters")]
    TooLong(String),
    /// Outside [`CHARSET`] (the name is shown escaped).
    #[error("name {0:?} is not {CHARSET}")]
    Charset(String),
}

/// Checks `name` against [`CHARSET`].
///
/// # Errors
/// See [`NameError`].
pub fn check(name: &str) -> Result<(), NameError> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(NameError::Empty);
    };
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if !plain(first) || !chars.all(|c| plain(c) || c == '.' || c == '-') {
        return Err(NameError::Charset(name.into()));
    }
    if name.len() > MAX_LEN {
        return Err(NameError::TooLong(name.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_pass() {
        for good in [
            "testrootfs",
            "firmware",
            "0_smoke",
            "records.jsonl",
            "a-b_c.d",
            "_x",
        ] {
            assert_eq!(check(good), Ok(()), "{good}");
        }
        assert_eq!(check(""), Err(NameError::Empty));
        assert!(matches!(check(&"a".repeat(65)), Err(NameError::TooLong(_))));
        for bad in [
            ".",
            "..",
            ".hidden",
            "-rf",
            "a/b",
            "/abs",
            "a\\b",
            "a b",
            "a\nb",
            "é",
            "a\0",
            "x\u{1b}[2J",
        ] {
            assert!(matches!(check(bad), Err(NameError::Charset(_))), "{bad:?}");
        }
    }
}
