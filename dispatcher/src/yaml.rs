//! Reading the YAML files users write, with errors that say file, line and key.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A YAML file that could not be read or does not fit its schema.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    /// Unreadable.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bad YAML, unknown key, wrong type. `message` names the key path.
    #[error("{path}:{line}:{column}: {message}")]
    Schema {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What is wrong, with the key path.
        message: String,
    },
}

/// Parses `text` (from `path`) into `T`.
///
/// # Errors
/// [`YamlError::Schema`] with the line, column and key path.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, YamlError> {
    serde_norway::from_str(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        // The library appends " at line L column C"; we put it in front instead.
        let mut message = e.to_string();
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        YamlError::Schema {
            path: path.into(),
            line,
            column,
            message,
        }
    })
}

/// Reads and parses a YAML file.
///
/// # Errors
/// See [`YamlError`].
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, YamlError> {
    let text = std::fs::read_to_string(path).map_err(|source| YamlError::Read {
        path: path.into(),
        source,
    })?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        inner: Inner,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: u32,
    }

    #[test]
    fn unknown_nested_key_names_file_line_and_path() {
        let err = parse::<Outer>(
            Path::new("job.yaml"),
            "name: x\ninner:\n  size: 1\n  colour: red\n",
        )
        .expect_err("bad");
        let msg = err.to_string();
        assert!(
            msg.starts_with("job.yaml:4:3: inner: unknown field `colour`"),
            "{msg}"
        );
    }
}
