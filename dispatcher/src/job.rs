//! The job file and the LAVA test definitions it names, checked up front
//! (before the board is touched) and turned into the test plan.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::plan::v1::{Definition, Param, TestPlan};
use serde::Deserialize;
use serde_norway::{Mapping, Value};

use crate::device::Device;
use crate::outcome::Failure;
use crate::yaml;

/// LAVA's test definition format string.
pub const LAVA_FORMAT: &str = "Lava-Test Test Definition 1.0";

/// Job timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// The whole job.
    #[serde(with = "humantime_serde")]
    pub job: Duration,
    /// All deploys together.
    #[serde(with = "humantime_serde")]
    pub deploy: Duration,
    /// From rebooting into the test image until the board is back in its master image.
    #[serde(with = "humantime_serde")]
    pub test: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            job: Duration::from_secs(3600),
            deploy: Duration::from_secs(1200),
            test: Duration::from_secs(1800),
        }
    }
}

/// A size in bytes, written `65536`, `64KiB`, `100MiB`, `1GiB` (binary) or
/// `10MB` (decimal), or `unlimited` (0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    /// Parses the forms above.
    pub fn parse(text: &str) -> Option<Size> {
        let t = text.trim();
        if t == "unlimited" {
            return Some(Size(0));
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(digits);
        let n: u64 = n.parse().ok()?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return None,
        };
        n.checked_mul(mult).map(Size)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let text = match &v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => String::new(),
        };
        Size::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not a size (e.g. 1048576, 64KiB, 100MiB, 1GiB, unlimited)"
            ))
        })
    }
}

/// Output quotas: what the test agent records of the tests' output. Beyond
/// a quota, output is counted, not kept; results are always kept.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Output each definition may record.
    pub definition_output: Size,
    /// Output the whole job may record.
    pub job_output: Size,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            definition_output: Size(256 << 20),
            job_output: Size(1 << 30),
        }
    }
}

/// Compression of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Raw.
    None,
    /// gzip.
    Gzip,
    /// xz.
    Xz,
    /// zstd.
    Zstd,
}

/// How much of a deploy is checked beyond the file's sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// The file as received (its sha256) and each bmap range as written.
    #[default]
    Stream,
    /// Also read the written image back from the partition and check it.
    Readback,
}

/// Whether a job's `image:` or `bmap:` names an http(s) URL (the board
/// pulls it) rather than a file (the dispatcher streams it).
pub fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// One image to write.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployEntry {
    /// The image: a file relative to the job file, or an http(s) URL the
    /// board downloads itself.
    pub image: PathBuf,
    /// The target partition, named in the device file.
    pub to: String,
    /// sha256 of the image file as given.
    #[serde(default)]
    pub sha256: String,
    /// Instead of `sha256`: a `sha256sum`-style file holding it (as build
    /// pipelines publish next to images), relative to the job file.
    #[serde(default)]
    pub sha256_file: Option<PathBuf>,
    /// Compression; detected from the first bytes when absent.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// The image's bmap (bmaptool's XML): a file relative to the job file,
    /// or an http(s) URL the board fetches.
    #[serde(default)]
    pub bmap: Option<String>,
    /// `readback`: the board reads the written image back and checks it.
    #[serde(default)]
    pub verify: Verify,
}

impl DeployEntry {
    /// The image's URL, when it is one.
    pub fn url(&self) -> Option<&str> {
        self.image.to_str().filter(|s| is_url(s))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestSection {
    definitions: Vec<DefinitionRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionRef {
    /// LAVA's `from: git|inline|path`; inferred from the other keys when absent.
    from: Option<String>,
    /// A git repository; `path` is then the definition inside it.
    repository: Option<String>,
    branch: Option<String>,
    revision: Option<String>,
    /// LAVA keeps `.git` unless `history: false`; Ferry never ships it.
    history: Option<bool>,
    path: Option<PathBuf>,
    inline: Option<LavaDefinition>,
    name: Option<String>,
    #[serde(default)]
    parameters: Mapping,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    skip_install: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    job: String,
    #[serde(default)]
    timeouts: Timeouts,
    #[serde(default)]
    deploy: Vec<DeployEntry>,
    #[serde(default)]
    quotas: Quotas,
    test: Option<TestSection>,
    /// A health check: `outcome.json` says whether to take the board offline.
    #[serde(default)]
    health_check: bool,
    /// Overrides of the device file's retries.
    #[serde(default)]
    retries: crate::device::RetriesOverride,
    /// How the records come back.
    #[serde(default)]
    records: RecordsSettings,
}

/// The job's `records:` section.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsSettings {
    /// `auto` or `always`.
    #[serde(default)]
    pub fetch: Fetch,
}

/// When the records are fetched through the master image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fetch {
    /// Only when the live stream did not bring every record (cut, absent,
    /// not matching): otherwise the board is powered off after the test.
    #[default]
    Auto,
    /// After every test boot, even when the stream brought every record
    /// (the board's filesystem checked, the master image exercised).
    Always,
}

/// A LAVA "Lava-Test Test Definition 1.0".
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LavaDefinition {
    metadata: Metadata,
    #[serde(default)]
    params: Option<Mapping>,
    #[serde(default)]
    parameters: Option<Mapping>,
    #[serde(default)]
    install: Option<Install>,
    run: Run,
    #[serde(default)]
    parse: Option<Parse>,
}

/// LAVA's `parse` block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Parse {
    pattern: String,
    #[serde(default)]
    fixupdict: Mapping,
}

impl Parse {
    /// Checks the pattern as the board will compile it, so a pattern it
    /// cannot use is a job error before the board is touched.
    fn check(&self, origin: &str) -> Result<Vec<(String, String)>, Failure> {
        let regex = regex::Regex::new(&self.pattern).map_err(|e| {
            Failure::job(format!(
                "{origin}: parse.pattern {:?} is not a regular expression Ferry reads (Python lookaround and backreferences are not supported): {e}",
                self.pattern
            ))
        })?;
        for group in ["test_case_id", "result"] {
            if !regex.capture_names().flatten().any(|n| n == group) {
                return Err(Failure::job(format!(
                    "{origin}: parse.pattern {:?} has no named group (?P<{group}>...)",
                    self.pattern
                )));
            }
        }
        self.fixupdict
            .iter()
            .map(|(k, v)| match (scalar(k), scalar(v)) {
                (Some(k), Some(v)) => Ok((k, v)),
                _ => Err(Failure::job(format!(
                    "{origin}: parse.fixupdict entries must map a word to a word"
                ))),
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Metadata {
    format: String,
    name: String,
    // description, maintainer, os, scope, devices, environment: informative.
    #[serde(flatten)]
    _other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct Install {
    #[serde(default)]
    steps: Vec<Value>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Run {
    steps: Vec<Value>,
}

/// The most the repositories of a plan's git definitions may weigh,
/// compressed: the plan travels in one call the master agent caps at 4 MiB.
const MAX_SHIPPED_TREES: usize = 3 << 20;

/// Where a git definition came from, and its tree.
#[derive(Default)]
struct GitSource {
    repository: String,
    path: String,
    revision: String,
    commit: String,
    tree: Vec<u8>,
}

/// The checkout as a gzip'd tar, paths relative to its root.
fn pack_tree(dir: &Path) -> std::io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()?.finish()
}

/// Reads a job file: Ferry's own, or a LAVA v2 job translated into it.
fn read_job(path: &Path) -> Result<(JobFile, Vec<String>), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::job(format!("job file {}: {e}", path.display())))?;
    let doc: Value = serde_norway::from_str(&text).unwrap_or(Value::Null);
    if !crate::lava_job::is_lava(&doc) {
        let file = yaml::parse(path, &text).map_err(|e| Failure::job(format!("job file {e}")))?;
        return Ok((file, Vec::new()));
    }
    let (ferry, warnings) = crate::lava_job::translate(path, &text, &doc).map_err(|keys| {
        Failure::job(format!(
            "LAVA job file {}: Ferry cannot honour {} key(s):\n  {}",
            path.display(),
            keys.len(),
            keys.join("\n  ")
        ))
    })?;
    let file = serde_norway::from_value(ferry).map_err(|e| {
        Failure::job(format!(
            "LAVA job file {} (translated): {e}",
            path.display()
        ))
    })?;
    Ok((file, warnings))
}

/// The Ferry job a LAVA v2 job file translates to, as YAML
/// (`dispatcher translate`).
///
/// # Errors
/// An unreadable file, one that is not a LAVA job, or the keys Ferry cannot honour.
pub fn translate_lava(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::job(format!("job file {}: {e}", path.display())))?;
    let doc: Value = serde_norway::from_str(&text)
        .map_err(|e| Failure::job(format!("job file {}: {e}", path.display())))?;
    if !crate::lava_job::is_lava(&doc) {
        return Err(Failure::job(format!(
            "{}: not a LAVA v2 job (no `job_name` and `actions`)",
            path.display()
        )));
    }
    let (ferry, _) = crate::lava_job::translate(path, &text, &doc).map_err(|keys| {
        Failure::job(format!(
            "LAVA job file {}: Ferry cannot honour {} key(s):\n  {}",
            path.display(),
            keys.len(),
            keys.join("\n  ")
        ))
    })?;
    serde_norway::to_string(&ferry).map_err(|e| Failure::job(e.to_string()))
}

/// A checked job.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job's name.
    pub name: String,
    /// The job file.
    pub path: PathBuf,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Images to write, paths resolved.
    pub deploy: Vec<DeployEntry>,
    /// The test plan (empty when the job has no `test`).
    pub plan: TestPlan,
    /// Things accepted but not acted on, for the log and summary.
    pub warnings: Vec<String>,
    /// A health check: its outcome says whether the board should go offline.
    pub health_check: bool,
    /// Overrides of the device file's retries.
    pub retries: crate::device::RetriesOverride,
    /// `records.fetch`: whether a complete live stream spares the fetch.
    pub fetch: Fetch,
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

/// Job and suite names travel to the board and become paths there: the
/// master agent refuses anything outside the wire charset, so refuse it here
/// first, before the board is touched.
fn valid_name(s: &str) -> bool {
    ferry_proto::names::check(s).is_ok()
}

fn valid_var(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Adds `map`'s entries to `params`, replacing same-named ones in place.
fn merge_params(params: &mut Vec<Param>, map: &Mapping, origin: &str) -> Result<(), Failure> {
    for (k, v) in map {
        let name = scalar(k).filter(|n| valid_var(n)).ok_or_else(|| {
            Failure::job(format!(
                "{origin}: parameter name {k:?} is not a shell variable name"
            ))
        })?;
        let value = scalar(v)
            .ok_or_else(|| Failure::job(format!("{origin}: parameter {name} must be a scalar")))?;
        match params.iter_mut().find(|p| p.name == name) {
            Some(p) => p.value = value,
            None => params.push(Param { name, value }),
        }
    }
    Ok(())
}

/// The host of an http(s) URL, when it has one (the board resolves it).
fn reqwest_like_url(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty() && !host.contains(char::is_whitespace)).then_some(host)
}

fn steps(values: &[Value], origin: &str, key: &str) -> Result<Vec<String>, Failure> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            scalar(v)
                .ok_or_else(|| Failure::job(format!("{origin}: {key}[{i}] must be a shell line")))
        })
        .collect()
}

impl Job {
    /// Loads a job file, its definitions and images, and checks them against the device.
    ///
    /// # Errors
    /// A job error naming the file, line and key, or the entry at fault.
    pub fn load(path: &Path, device: &Device) -> Result<Self, Failure> {
        let (file, lava_warnings) = read_job(path)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let at = |key: String| format!("job file {}: {key}", path.display());
        if !valid_name(&file.job) {
            return Err(Failure::job(at(format!(
                "job: {:?} must match {}",
                file.job,
                ferry_proto::names::CHARSET
            ))));
        }
        let mut deploy = Vec::new();
        for (i, mut d) in file.deploy.into_iter().enumerate() {
            if !device.partitions.contains(&d.to) {
                return Err(Failure::job(at(format!(
                    "deploy[{i}].to: partition {:?} is not in the device file's partitions {:?}",
                    d.to, device.partitions
                ))));
            }
            match (d.sha256.is_empty(), d.sha256_file.take()) {
                (false, None) => {}
                (true, Some(f)) => {
                    let f = dir.join(f);
                    let text = std::fs::read_to_string(&f).map_err(|e| {
                        Failure::job(at(format!("deploy[{i}].sha256_file: {}: {e}", f.display())))
                    })?;
                    d.sha256 = text
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                }
                _ => {
                    return Err(Failure::job(at(format!(
                        "deploy[{i}]: give exactly one of `sha256` or `sha256_file`"
                    ))))
                }
            }
            if !ferry_proto::is_sha256(&d.sha256) {
                return Err(Failure::job(at(format!(
                    "deploy[{i}].sha256: {:?} is not 64 hex digits",
                    d.sha256
                ))));
            }
            if let Some(b) = d.bmap.as_mut().filter(|b| !is_url(b)) {
                let path = dir.join(&*b);
                if !path.is_file() {
                    return Err(Failure::job(at(format!(
                        "deploy[{i}].bmap: {} is not a readable file",
                        path.display()
                    ))));
                }
                *b = path.display().to_string();
            }
            if let Some(url) = d.url() {
                if reqwest_like_url(url).is_none() {
                    return Err(Failure::job(at(format!(
                        "deploy[{i}].image: {url:?} is not a valid URL"
                    ))));
                }
                deploy.push(d);
                continue;
            }
            d.image = dir.join(&d.image);
            if !d.image.is_file() {
                return Err(Failure::job(at(format!(
                    "deploy[{i}].image: {} is not a readable file",
                    d.image.display()
                ))));
            }
            deploy.push(d);
        }

        let mut warnings = lava_warnings;
        let mut definitions: Vec<Definition> = Vec::new();
        let mut shipped = 0usize;
        for (i, r) in file
            .test
            .map(|t| t.definitions)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let key = format!("test.definitions[{i}]");
            let mut source = GitSource::default();
            let from_git = r.repository.is_some() || r.from.as_deref() == Some("git");
            if let Some(from) = r
                .from
                .as_deref()
                .filter(|f| !["git", "inline", "path"].contains(f))
            {
                return Err(Failure::job(at(format!(
                    "{key}.from: {from:?} is not supported; use git, inline or path"
                ))));
            }
            if !from_git && (r.branch.is_some() || r.revision.is_some() || r.history.is_some()) {
                return Err(Failure::job(at(format!(
                    "{key}: `branch`, `revision` and `history` need a `repository`"
                ))));
            }
            let (def, origin) = match (&r.path, r.inline) {
                (Some(p), None) if from_git => {
                    let repository = r.repository.clone().ok_or_else(|| {
                        Failure::job(at(format!("{key}: `from: git` needs a `repository`")))
                    })?;
                    if p.is_absolute()
                        || p.components().any(|c| c == std::path::Component::ParentDir)
                    {
                        return Err(Failure::job(at(format!(
                            "{key}.path: {} must be a path inside the repository",
                            p.display()
                        ))));
                    }
                    let checkout = crate::git::fetch(
                        &repository,
                        r.branch.as_deref(),
                        r.revision.as_deref(),
                        &crate::git::cache_dir(),
                        file.timeouts.deploy,
                    )
                    .map_err(|e| Failure::job(at(format!("{key}.repository: {e}"))))?;
                    let full = checkout.dir.join(p);
                    let def: LavaDefinition = yaml::load(&full).map_err(|e| {
                        Failure::job(format!("test definition {repository} {}: {e}", p.display()))
                    })?;
                    if r.history == Some(true) {
                        warnings.push(format!(
                            "{key}: history: true is accepted, but only the tree at {} is shipped to the board",
                            checkout.commit
                        ));
                    }
                    source = GitSource {
                        tree: pack_tree(&checkout.dir).map_err(|e| {
                            Failure::job(at(format!(
                                "{key}: packing {}: {e}",
                                checkout.dir.display()
                            )))
                        })?,
                        repository: repository.clone(),
                        path: p.display().to_string(),
                        revision: r
                            .revision
                            .clone()
                            .or_else(|| r.branch.clone())
                            .unwrap_or_default(),
                        commit: checkout.commit.clone(),
                    };
                    shipped += source.tree.len();
                    if shipped > MAX_SHIPPED_TREES {
                        return Err(Failure::job(at(format!(
                            "{key}: the definitions' repositories come to {shipped} bytes compressed, more than the {MAX_SHIPPED_TREES} a test plan may carry; use a smaller repository"
                        ))));
                    }
                    (
                        def,
                        format!("{repository}@{}:{}", checkout.commit, p.display()),
                    )
                }
                (Some(p), None) => {
                    let full = dir.join(p);
                    let def: LavaDefinition = yaml::load(&full)
                        .map_err(|e| Failure::job(format!("test definition {e}")))?;
                    (def, full.display().to_string())
                }
                (None, Some(def)) => (def, format!("{} {key}.inline", path.display())),
                _ => {
                    return Err(Failure::job(at(format!(
                        "{key}: give exactly one of `path` (with `repository` for git) or `inline`"
                    ))))
                }
            };
            if def.metadata.format != LAVA_FORMAT {
                return Err(Failure::job(format!(
                    "{origin}: metadata.format is {:?}; expected {LAVA_FORMAT:?}",
                    def.metadata.format
                )));
            }
            let name = r.name.unwrap_or_else(|| def.metadata.name.clone());
            if !valid_name(&name) {
                return Err(Failure::job(format!(
                    "{origin}: name {name:?} must match {}",
                    ferry_proto::names::CHARSET
                )));
            }
            if definitions.iter().any(|d| d.name == name) {
                return Err(Failure::job(at(format!(
                    "{key}: a definition named {name:?} is already in this job"
                ))));
            }
            let mut params = Vec::new();
            for map in [&def.params, &def.parameters].into_iter().flatten() {
                merge_params(&mut params, map, &origin)?;
            }
            merge_params(&mut params, &r.parameters, &at(format!("{key}.parameters")))?;
            let mut lines = Vec::new();
            let mut install_deps = Vec::new();
            if let Some(install) = &def.install {
                if !r.skip_install {
                    lines.extend(steps(&install.steps, &origin, "install.steps")?);
                    if let Some(deps) = install.other.get("deps") {
                        let list = deps.as_sequence().map(Vec::as_slice).unwrap_or_default();
                        install_deps = steps(list, &origin, "install.deps")?;
                        if deps.as_sequence().is_none() && !deps.is_null() {
                            return Err(Failure::job(format!(
                                "{origin}: install.deps must be a list of package names"
                            )));
                        }
                    }
                }
                let ignored: Vec<_> = install
                    .other
                    .keys()
                    .filter(|k| *k != "deps")
                    .cloned()
                    .collect();
                if !ignored.is_empty() {
                    warnings.push(format!(
                        "{name}: install keys {ignored:?} are deprecated in LAVA and not acted on"
                    ));
                }
            }
            lines.extend(steps(&def.run.steps, &origin, "run.steps")?);
            let (parse_pattern, fixupdict) = match &def.parse {
                Some(p) => (p.pattern.clone(), p.check(&origin)?.into_iter().collect()),
                None => (String::new(), Default::default()),
            };
            definitions.push(Definition {
                name,
                steps: lines,
                params,
                timeout_seconds: r.timeout.map_or(0, |t| t.as_secs().max(1)),
                origin,
                parse_pattern,
                fixupdict,
                install_deps,
                repository: source.repository,
                path: source.path,
                revision: source.revision,
                commit: source.commit,
                tree_tar_gz: source.tree,
            });
        }
        Ok(Job {
            health_check: file.health_check,
            retries: file.retries,
            fetch: file.records.fetch,
            name: file.job.clone(),
            path: path.into(),
            timeouts: file.timeouts,
            deploy,
            plan: TestPlan {
                job: file.job,
                definitions,
                definition_output_quota: file.quotas.definition_output.0,
                job_output_quota: file.quotas.job_output.0,
                // Filled in by the run, once it listens.
                stream: None,
            },
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files(tempfile::TempDir);
    impl Files {
        fn new() -> Self {
            let f = Files(tempfile::tempdir().expect("tmp"));
            f.write("dev.yaml", "device: b\npower: {on: x, off: y}\nconsole: {tty: c}\npartitions: [testrootfs, fw]\n");
            f
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.path().join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("w");
            p
        }
        fn load(&self, job: &str) -> Result<Job, Failure> {
            let dev = Device::load(&self.0.path().join("dev.yaml")).expect("device");
            Job::load(&self.write("job.yaml", job), &dev)
        }
    }

    const DEF: &str = "metadata:\n  format: Lava-Test Test Definition 1.0\n  name: smoke\n  description: d\nparams:\n  A: 1\n  B: two\nrun:\n  steps:\n    - echo $A\n    - lava-test-case x --result pass\n";

    #[test]
    fn builds_the_plan_with_parameter_overrides() {
        let f = Files::new();
        f.write("defs/smoke.yaml", DEF);
        let job = f
            .load("job: j\ntest:\n  definitions:\n    - path: defs/smoke.yaml\n      parameters: {B: three, C: 4}\n      timeout: 90s\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: other}\n        run: {steps: [true]}\n")
            .expect("job");
        let d = &job.plan.definitions;
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "smoke");
        let params: Vec<_> = d[0]
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(params, vec![("A", "1"), ("B", "three"), ("C", "4")]);
        assert_eq!(d[0].timeout_seconds, 90);
        assert_eq!(d[1].steps, vec!["true"]);
        assert_eq!(job.plan.definition_output_quota, 256 << 20);
        assert_eq!(job.plan.job_output_quota, 1 << 30);
    }

    #[test]
    fn quotas_are_sizes() {
        let f = Files::new();
        let job = f
            .load("job: j\nquotas: {definition_output: 64KiB, job_output: unlimited}\n")
            .expect("job");
        assert_eq!(job.plan.definition_output_quota, 64 << 10);
        assert_eq!(job.plan.job_output_quota, 0);
        for (text, size) in [
            ("65536", 65536),
            ("10MB", 10_000_000),
            ("1 GiB", 1 << 30),
            ("2M", 2 << 20),
        ] {
            assert_eq!(Size::parse(text), Some(Size(size)), "{text}");
        }
        for bad in ["", "ten", "1TiB", "-1", "1.5MiB"] {
            assert_eq!(Size::parse(bad), None, "{bad}");
        }
        let e = f
            .load("job: j\nquotas: {definition_output: lots}\n")
            .expect_err("bad size");
        assert!(e.message.contains("is not a size"), "{}", e.message);
    }

    #[test]
    fn a_url_image_is_left_to_the_board_and_a_local_bmap_is_resolved() {
        let f = Files::new();
        f.write("img.bmap", "<bmap/>");
        let job = f
            .load("job: j\ndeploy:\n  - {image: 'https://artifacts.example/img.wic.zst', bmap: img.bmap, to: fw, compression: zstd, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}\n")
            .expect("job");
        let d = &job.deploy[0];
        assert_eq!(d.url(), Some("https://artifacts.example/img.wic.zst"));
        assert_eq!(d.compression, Some(Compression::Zstd));
        assert_eq!(
            d.bmap.as_deref().map(Path::new),
            Some(f.0.path().join("img.bmap").as_path())
        );
    }

    #[test]
    fn job_errors_say_where() {
        let f = Files::new();
        f.write("defs/smoke.yaml", DEF);
        f.write("img", "x");
        let cases = [
            ("job: j\nfrobnicate: 1\n", "job.yaml:2:1: unknown field `frobnicate`"),
            ("job: j\ntest:\n  definitions:\n    - inline:\n        metadata: {format: x, name: y}\n        run: {stepz: []}\n", "job.yaml:6:15: test.definitions[0].inline.run: unknown field `stepz`"),
            ("job: j\ntest:\n  definitions:\n    - path: defs/smoke.yaml\n    - path: defs/smoke.yaml\n", "test.definitions[1]: a definition named \"smoke\" is already in this job"),
            ("job: j\ndeploy:\n  - {image: img, to: nowhere, sha256: x}\n", "deploy[0].to: partition \"nowhere\""),
            ("job: j\ndeploy:\n  - {image: img, to: fw, sha256: abc}\n", "deploy[0].sha256"),
            ("job: j\ndeploy:\n  - {image: missing, to: fw, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}\n", "deploy[0].image"),
            ("job: j\ntimeouts: {test: forever}\n", "job.yaml:2:"),
            ("job: j\ntest:\n  definitions:\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: y}\n        run: {steps: []}\n        parse: {pattern: '(?P<test_case_id>\\w+)(?=:)(?P<result>\\w+)'}\n", "Python lookaround and backreferences are not supported"),
            ("job: j\ntest:\n  definitions:\n    - inline:\n        metadata: {format: Lava-Test Test Definition 1.0, name: y}\n        run: {steps: []}\n        parse: {pattern: '(?P<test_case_id>\\w+) (?P<res>\\w+)'}\n", "has no named group (?P<result>...)"),
            ("job: j\ndeploy:\n  - {image: img, to: fw, bmap: nope.bmap, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}\n", "deploy[0].bmap"),
            ("job: j\ndeploy:\n  - {image: 'https:// x', to: fw, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}\n", "is not a valid URL"),
            ("job: j\ndeploy:\n  - {image: img, to: fw, compression: lz4, sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08}\n", "unknown variant `lz4`"),
            ("job: j\ntest:\n  definitions:\n    - inline:\n        metadata: {format: Lava-Test-Shell Test Definition 1.0, name: y}\n        run: {steps: []}\n", "expected \"Lava-Test Test Definition 1.0\""),
        ];
        for (job, expected) in cases {
            let e = f.load(job).expect_err(job);
            assert_eq!(e.kind, crate::outcome::Kind::JobInput);
            assert!(e.message.contains(expected), "{job}\n=> {}", e.message);
        }
    }
}
