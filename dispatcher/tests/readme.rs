//! The README's YAML examples are real: each is the file it names, or loads
//! with the same code the dispatcher uses.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Every ```yaml block of the README, with the line it starts on.
fn yaml_blocks(readme: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in readme.lines().enumerate() {
        match current.as_mut() {
            None if line.trim_start() == "```yaml" => current = Some((n + 2, String::new())),
            None => {}
            Some(_) if line.trim_start() == "```" => blocks.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    blocks
}

fn without_comments(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect()
}

#[test]
fn every_yaml_example_in_the_readme_is_real() {
    let root = workspace();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let blocks = yaml_blocks(&readme);
    assert!(!blocks.is_empty(), "README.md has no yaml examples");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut files, mut devices, mut scenarios) = (0, 0, 0);
    for (line, text) in &blocks {
        let at = format!("README.md:{line}");
        let first = text.lines().next().unwrap_or_default();
        if let Some(named) = first
            .strip_prefix("# ")
            .map(|rest| rest.split_whitespace().next().unwrap_or_default())
            .filter(|p| p.starts_with("examples/"))
        {
            // A block naming a file shows that file (its own comments aside).
            let file = std::fs::read_to_string(root.join(named))
                .unwrap_or_else(|e| panic!("{at}: {named}: {e}"));
            assert_eq!(
                without_comments(text),
                without_comments(&file),
                "{at}: the example differs from {named}"
            );
            files += 1;
        } else if text.contains("\npower:") {
            let path = tmp.path().join(format!("device-{line}.yaml"));
            std::fs::write(&path, text).expect("write");
            ferry_dispatcher::device::Device::load(&path)
                .unwrap_or_else(|e| panic!("{at}: the device file example does not load: {e}"));
            devices += 1;
        } else if text.starts_with("boards:") {
            let path = tmp.path().join(format!("scenario-{line}.yaml"));
            std::fs::write(&path, text).expect("write");
            ferry_dispatcher::lab::load_scenario(&path)
                .unwrap_or_else(|e| panic!("{at}: the scenario example does not load: {e}"));
            scenarios += 1;
        } else {
            serde_norway::from_str::<serde_norway::Value>(text)
                .unwrap_or_else(|e| panic!("{at}: not YAML: {e}"));
        }
    }
    assert!(files >= 1, "no README example names its file");
    assert!(devices >= 1, "no device file example in the README");
    assert!(scenarios >= 1, "no lab scenario example in the README");
}
