//! LAVA v2 job files, accepted as they are: recognised by their keys
//! (`job_name` and `actions`) and translated into Ferry's job file before
//! it is checked. What Ferry cannot honour is never dropped: every such key
//! is listed, with its file, line and path, as one job error.

use std::path::Path;

use serde_norway::{Mapping, Value};

/// Whether `doc` is a LAVA v2 job (Ferry's own jobs have `job`, never `actions`).
pub fn is_lava(doc: &Value) -> bool {
    doc.get("job_name").is_some() && doc.get("actions").is_some()
}

/// Finds the line of each key, in document order, in the raw text.
struct Lines<'a> {
    lines: Vec<&'a str>,
    /// Per key name, the line after its last use.
    cursor: std::collections::HashMap<String, usize>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        Lines {
            lines: text.lines().collect(),
            cursor: Default::default(),
        }
    }

    /// The 1-based line of the next occurrence of `key` as a mapping key.
    fn next(&mut self, key: &str) -> usize {
        let from = self.cursor.get(key).copied().unwrap_or(0);
        let found = self.lines[from.min(self.lines.len())..]
            .iter()
            .position(|l| {
                let mut rest = *l;
                while let Some(i) = rest.find(key) {
                    let before = rest[..i].chars().last();
                    let after = rest[i + key.len()..].trim_start();
                    if before.is_none_or(|c| " \t{,-\"'".contains(c))
                        && (after.starts_with(':')
                            || after.starts_with("\":")
                            || after.starts_with("':"))
                    {
                        return true;
                    }
                    rest = &rest[i + key.len()..];
                }
                false
            })
            .map(|i| from + i);
        match found {
            Some(i) => {
                self.cursor.insert(key.into(), i + 1);
                i + 1
            }
            None => 0,
        }
    }
}

/// The translation's state: what was refused, and where.
struct Translate<'a> {
    file: &'a Path,
    lines: Lines<'a>,
    unsupported: Vec<String>,
    warnings: Vec<String>,
}

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

impl Translate<'_> {
    /// Walks `map` in order, giving each key its line; keys not in `ok` are refused.
    fn keys<'m>(
        &mut self,
        map: &'m Mapping,
        path: &str,
        ok: &[&str],
    ) -> Vec<(String, &'m Value, usize)> {
        let mut out = Vec::new();
        for (k, v) in map {
            let name = key_str(k);
            let line = self.lines.next(&name);
            let full = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            if ok.contains(&name.as_str()) {
                out.push((name, v, line));
            } else {
                self.refuse(line, &full);
            }
        }
        out
    }

    fn refuse(&mut self, line: usize, path: &str) {
        self.unsupported
            .push(format!("{}:{line}: {path}", self.file.display()));
    }

    /// Marks every key below `v` as seen, so later lines are found in order.
    fn skip(&mut self, v: &Value) {
        match v {
            Value::Mapping(m) => {
                for (k, v) in m {
                    self.lines.next(&key_str(k));
                    self.skip(v);
                }
            }
            Value::Sequence(s) => s.iter().for_each(|v| self.skip(v)),
            _ => {}
        }
    }

    /// A LAVA timeout: exactly one of days/hours/minutes/seconds.
    fn timeout(&mut self, v: &Value, path: &str, line: usize) -> Option<String> {
        let Some(m) = v.as_mapping() else {
            self.refuse(
                line,
                &format!("{path} (a timeout is a map of one of days, hours, minutes, seconds)"),
            );
            return None;
        };
        let units = self.keys(m, path, &["days", "hours", "minutes", "seconds"]);
        if units.len() != 1 {
            if !units.is_empty() {
                self.refuse(
                    line,
                    &format!("{path} (give exactly one of days, hours, minutes, seconds)"),
                );
            }
            return None;
        }
        let (unit, n, line) = &units[0];
        let Some(n) = n.as_u64() else {
            self.refuse(*line, &format!("{path}.{unit} (a whole number)"));
            return None;
        };
        let secs = match unit.as_str() {
            "days" => n * 86_400,
            "hours" => n * 3_600,
            "minutes" => n * 60,
            _ => n,
        };
        Some(format!("{secs}s"))
    }
}

/// LAVA's `skip_install`: a list of `keys`, `sources`, `deps`, `steps`,
/// `git-repos`, `all` (a boolean too, as Ferry's). Ferry installs `deps` and
/// runs `steps` (it has no keys, sources or git-repos to skip), and skips
/// both or neither.
fn skip_install(v: &Value) -> Result<bool, String> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        Value::Sequence(list) => {
            let has = |w: &str| list.iter().any(|x| x.as_str() == Some(w));
            if has("all") || (has("deps") && has("steps")) {
                Ok(true)
            } else if has("deps") || has("steps") {
                Err("Ferry skips deps and steps together: list both, or all".into())
            } else {
                Ok(false)
            }
        }
        _ => Err("a list of keys, sources, deps, steps, git-repos, all".into()),
    }
}

/// Translates a LAVA v2 job (`text`, from `file`) into Ferry's job file.
///
/// # Errors
/// The list of every key Ferry cannot honour (`file:line: path`).
pub fn translate(
    file: &Path,
    text: &str,
    doc: &Value,
) -> Result<(Value, Vec<String>), Vec<String>> {
    let mut t = Translate {
        file,
        lines: Lines::new(text),
        unsupported: Vec::new(),
        warnings: Vec::new(),
    };
    let mut job = Mapping::new();
    let mut timeouts = Mapping::new();
    let mut deploy: Vec<Value> = Vec::new();
    let mut definitions: Vec<Value> = Vec::new();
    let (mut action_timeout, mut deploy_timeout, mut test_timeout) = (None, None, None);
    let mut boot_retry: Option<u64> = None;
    let mut secrets: Option<Mapping> = None;
    let empty = Mapping::new();
    let top = doc.as_mapping().unwrap_or(&empty);
    let accepted = [
        "job_name",
        "device_type",
        "timeouts",
        "priority",
        "visibility",
        "metadata",
        "context",
        "tags",
        "actions",
        // Added by lava-server to every job it hands a worker.
        "compatibility",
        "secrets",
    ];
    for (key, v, line) in t.keys(top, "", &accepted) {
        match key.as_str() {
            "job_name" => {
                // LAVA allows spaces in names; Ferry's names become paths on the board.
                let name = v.as_str().map(|s| {
                    s.chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                                c
                            } else {
                                '_'
                            }
                        })
                        .take(64)
                        .collect::<String>()
                });
                job.insert("job".into(), name.unwrap_or_default().into());
            }
            "timeouts" => {
                let m = v.as_mapping().unwrap_or(&empty);
                for (k, v, line) in t.keys(
                    m,
                    "timeouts",
                    &["job", "action", "connection", "actions", "connections"],
                ) {
                    match k.as_str() {
                        "job" => {
                            if let Some(d) = t.timeout(v, "timeouts.job", line) {
                                timeouts.insert("job".into(), d.into());
                            }
                        }
                        "action" => action_timeout = t.timeout(v, "timeouts.action", line),
                        other => {
                            // Per-action and connection timeouts have no Ferry
                            // equivalent: the board's own timeouts bound those steps.
                            t.skip(v);
                            t.warnings.push(format!("timeouts.{other} accepted but not applied (the device file's timeouts bound those steps)"));
                        }
                    }
                }
            }
            "secrets" => {
                t.skip(v);
                match v.as_mapping() {
                    // LAVA hands secrets to the test shell as environment
                    // variables: every definition's parameters carry them.
                    Some(m) => secrets = Some(m.clone()),
                    None => t.refuse(line, "secrets (a map of names to values)"),
                }
            }
            "device_type" | "priority" | "visibility" | "metadata" | "context" | "tags"
            | "compatibility" => {
                t.skip(v);
                if !["device_type", "metadata", "compatibility"].contains(&key.as_str()) {
                    t.warnings
                        .push(format!("{key} is the scheduler's; accepted, not acted on"));
                }
            }
            "actions" => {
                let actions = v.as_sequence().cloned().unwrap_or_default();
                for (i, a) in actions.iter().enumerate() {
                    let m = a.as_mapping().unwrap_or(&empty);
                    for (kind, body, _line) in
                        t.keys(m, &format!("actions[{i}]"), &["deploy", "boot", "test"])
                    {
                        let path = format!("actions[{i}].{kind}");
                        let body = body.as_mapping().unwrap_or(&empty);
                        match kind.as_str() {
                            "deploy" => {
                                for (k, v, line) in
                                    t.keys(body, &path, &["to", "images", "timeout", "os"])
                                {
                                    match k.as_str() {
                                        "timeout" => {
                                            deploy_timeout =
                                                t.timeout(v, &format!("{path}.timeout"), line)
                                        }
                                        "images" => {
                                            let imgs = v.as_mapping().unwrap_or(&empty);
                                            for (name, img, _) in t.keys(
                                                imgs,
                                                &format!("{path}.images"),
                                                &imgs
                                                    .keys()
                                                    .map(key_str)
                                                    .collect::<Vec<_>>()
                                                    .iter()
                                                    .map(String::as_str)
                                                    .collect::<Vec<_>>(),
                                            ) {
                                                let ipath = format!("{path}.images.{name}");
                                                let mut entry = Mapping::new();
                                                entry.insert("to".into(), name.clone().into());
                                                let im = img.as_mapping().unwrap_or(&empty);
                                                for (k, v, line) in t.keys(
                                                    im,
                                                    &ipath,
                                                    &[
                                                        "url",
                                                        "compression",
                                                        "sha256sum",
                                                        "partition",
                                                    ],
                                                ) {
                                                    let s =
                                                        v.as_str().unwrap_or_default().to_string();
                                                    match k.as_str() {
                                                        "url" => match s.strip_prefix("file://") {
                                                            Some(p) => { entry.insert("image".into(), p.into()); }
                                                            None if !s.contains("://") || s.starts_with("http://") || s.starts_with("https://") => { entry.insert("image".into(), s.into()); }
                                                            None => t.refuse(line, &format!("{ipath}.url ({s}: http(s):// and file:// URLs and paths only)")),
                                                        },
                                                        "compression" => match s.as_str() {
                                                            "gz" | "gzip" => { entry.insert("compression".into(), "gzip".into()); }
                                                            "xz" | "zstd" => { entry.insert("compression".into(), s.into()); }
                                                            "none" | "" => { entry.insert("compression".into(), "none".into()); }
                                                            _ => t.refuse(line, &format!("{ipath}.compression ({s}: gz, xz, zstd or none)")),
                                                        },
                                                        "sha256sum" => { entry.insert("sha256".into(), s.into()); }
                                                        _ => { entry.insert("to".into(), s.into()); }
                                                    }
                                                }
                                                deploy.push(entry.into());
                                            }
                                        }
                                        _ => t.skip(v),
                                    }
                                }
                            }
                            "boot" => {
                                // Ferry boots the test image itself (boot-once, then its agent).
                                for (k, v, line) in t.keys(
                                    body,
                                    &path,
                                    &[
                                        "method",
                                        "prompts",
                                        "timeout",
                                        "auto_login",
                                        "failure_retry",
                                    ],
                                ) {
                                    if k == "failure_retry" {
                                        // LAVA powers on and boots again: Ferry's
                                        // power and boot retries (before any deploy).
                                        match v.as_u64() {
                                            Some(n) if n >= 1 => boot_retry = Some(n),
                                            _ => t.refuse(line, &format!("{path}.failure_retry (a whole number, at least 1)")),
                                        }
                                    } else {
                                        t.skip(v);
                                    }
                                }
                            }
                            _ => {
                                for (k, v, line) in t.keys(body, &path, &["definitions", "timeout"])
                                {
                                    if k == "timeout" {
                                        test_timeout =
                                            t.timeout(v, &format!("{path}.timeout"), line);
                                        continue;
                                    }
                                    for (j, d) in v
                                        .as_sequence()
                                        .cloned()
                                        .unwrap_or_default()
                                        .iter()
                                        .enumerate()
                                    {
                                        let dpath = format!("{path}.definitions[{j}]");
                                        let dm = d.as_mapping().unwrap_or(&empty);
                                        let mut def = Mapping::new();
                                        for (k, v, line) in t.keys(
                                            dm,
                                            &dpath,
                                            &[
                                                "from",
                                                "repository",
                                                "path",
                                                "name",
                                                "branch",
                                                "revision",
                                                "history",
                                                "parameters",
                                                "params",
                                                "skip_install",
                                            ],
                                        ) {
                                            match k.as_str() {
                                                "from" if v.as_str() == Some("url") => t.refuse(
                                                    line,
                                                    &format!(
                                                        "{dpath}.from (url: use git or inline)"
                                                    ),
                                                ),
                                                // LAVA's inline definitions sit in `repository`.
                                                "repository"
                                                    if dm.get("from").and_then(Value::as_str)
                                                        == Some("inline") =>
                                                {
                                                    t.skip(v);
                                                    def.insert("inline".into(), v.clone());
                                                }
                                                "from" => {
                                                    if v.as_str() == Some("git") {
                                                        def.insert("from".into(), "git".into());
                                                    }
                                                }
                                                "path"
                                                    if dm.get("from").and_then(Value::as_str)
                                                        == Some("inline") => {}
                                                "params" => {
                                                    t.skip(v);
                                                    def.insert("parameters".into(), v.clone());
                                                }
                                                "skip_install" => {
                                                    t.skip(v);
                                                    match skip_install(v) {
                                                        Ok(skip) => {
                                                            def.insert(
                                                                "skip_install".into(),
                                                                skip.into(),
                                                            );
                                                        }
                                                        Err(why) => t.refuse(
                                                            line,
                                                            &format!(
                                                                "{dpath}.skip_install ({why})"
                                                            ),
                                                        ),
                                                    }
                                                }
                                                _ => {
                                                    t.skip(v);
                                                    def.insert(k.into(), v.clone());
                                                }
                                            }
                                        }
                                        definitions.push(def.into());
                                    }
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(d) = deploy_timeout.or_else(|| action_timeout.clone()) {
        timeouts.insert("deploy".into(), d.into());
    }
    if let Some(d) = test_timeout.or(action_timeout) {
        timeouts.insert("test".into(), d.into());
    }
    if !timeouts.is_empty() {
        job.insert("timeouts".into(), timeouts.into());
    }
    if let Some(n) = boot_retry {
        let mut retry = Mapping::new();
        retry.insert("attempts".into(), n.into());
        let mut retries = Mapping::new();
        retries.insert("power".into(), retry.clone().into());
        retries.insert("boot".into(), retry.into());
        job.insert("retries".into(), retries.into());
    }
    if let Some(secrets) = secrets {
        for def in &mut definitions {
            if let Some(d) = def.as_mapping_mut() {
                let mut params = secrets.clone();
                // The definition's own parameters win over a secret's name.
                if let Some(Value::Mapping(p)) = d.get("parameters") {
                    for (k, v) in p {
                        params.insert(k.clone(), v.clone());
                    }
                }
                d.insert("parameters".into(), params.into());
            }
        }
    }
    if !deploy.is_empty() {
        job.insert("deploy".into(), deploy.into());
    }
    if !definitions.is_empty() {
        let mut test = Mapping::new();
        test.insert("definitions".into(), definitions.into());
        job.insert("test".into(), test.into());
    }
    if t.unsupported.is_empty() {
        Ok((job.into(), t.warnings))
    } else {
        Err(t.unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(text: &str) -> Result<Value, Vec<String>> {
        let doc: Value = serde_norway::from_str(text).expect("yaml");
        translate(Path::new("job.yaml"), text, &doc).map(|(v, _)| v)
    }

    const JOB: &str = "job_name: j
compatibility: 0
secrets: {API_TOKEN: s3cret, GREETING: from-secret}
actions:
- boot:
    method: minimal
    failure_retry: 3
- test:
    definitions:
    - from: git
      repository: https://example.org/defs.git
      path: a.yaml
      name: a
      parameters: {GREETING: hi}
      skip_install: [deps, steps]
    - from: git
      repository: https://example.org/defs.git
      path: b.yaml
      name: b
      skip_install: [keys]
";

    #[test]
    fn secrets_boot_retries_and_skip_install_lists_are_mapped() {
        let j = tr(JOB).expect("translates");
        assert_eq!(j["retries"]["boot"]["attempts"], 3);
        assert_eq!(j["retries"]["power"]["attempts"], 3);
        let defs = &j["test"]["definitions"];
        assert_eq!(defs[0]["parameters"]["API_TOKEN"], "s3cret");
        // The definition's own parameter wins over a secret of that name.
        assert_eq!(defs[0]["parameters"]["GREETING"], "hi");
        assert_eq!(defs[1]["parameters"]["GREETING"], "from-secret");
        assert_eq!(defs[0]["skip_install"], true);
        assert_eq!(defs[1]["skip_install"], false);
    }

    #[test]
    fn half_a_skip_install_and_a_bad_retry_are_refused() {
        let text = JOB
            .replace("skip_install: [deps, steps]", "skip_install: [deps]")
            .replace("failure_retry: 3", "failure_retry: many");
        let e = tr(&text).expect_err("refused");
        assert!(
            e.iter()
                .any(|l| l.contains(":7: actions[0].boot.failure_retry")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.contains(":15: actions[1].test.definitions[0].skip_install")),
            "{e:?}"
        );
    }
}
