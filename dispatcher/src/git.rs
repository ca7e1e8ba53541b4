//! Test definitions from git repositories, fetched on the dispatcher host
//! with the `git` binary and cached by commit.
//!
//! Why the binary and not a library: libgit2 (git2) or gitoxide (gix) add
//! minutes of compile time and a large dependency tree to every build on
//! these shared 2-core machines, while every lab host already has git, and
//! the binary honours the lab's own git configuration (proxies, credential
//! helpers, `insteadOf` mirrors) exactly as LAVA's workers do.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a repository could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git could not be started (not installed?).
    #[error("running git: {0} (is git installed on the dispatcher host?)")]
    Spawn(std::io::Error),
    /// git ran and failed.
    #[error("git {args}: {stderr}")]
    Failed {
        /// What was run.
        args: String,
        /// What git said.
        stderr: String,
    },
    /// git took longer than the job allows.
    #[error("git {args}: still running after {limit:?}")]
    Timeout {
        /// What was run.
        args: String,
        /// The bound.
        limit: Duration,
    },
    /// The branch or revision is not in the repository.
    #[error("{repository}: no {what} {name:?}")]
    NotFound {
        /// The repository.
        repository: String,
        /// "branch" or "revision".
        what: &'static str,
        /// The name.
        name: String,
    },
    /// The cache folder could not be used.
    #[error("git cache {path}: {source}")]
    Cache {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A checkout: a tree without history, and its commit.
#[derive(Debug, Clone)]
pub struct Checkout {
    /// The tree's folder in the cache (never modified once written).
    pub dir: PathBuf,
    /// The full commit id.
    pub commit: String,
}

/// `$FERRY_CACHE_DIR`, else `~/.cache/ferry`, else `$TMPDIR/ferry-cache`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_CACHE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Path::new(&home).join(".cache/ferry"),
        None => std::env::temp_dir().join("ferry-cache"),
    }
}

fn git(args: &[&str], cwd: Option<&Path>, limit: Duration) -> Result<String, GitError> {
    let shown = args.join(" ");
    let mut cmd = Command::new("git");
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().map_err(GitError::Spawn)?;
    // Small outputs: read them on threads so a full pipe never blocks git.
    let out = child.stdout.take().map(|mut o| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut o, &mut s);
            s
        })
    });
    let err = child.stderr.take().map(|mut o| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut o, &mut s);
            s
        })
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(GitError::Spawn)? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(GitError::Timeout { args: shown, limit });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.and_then(|t| t.join().ok()).unwrap_or_default();
    let stderr = err.and_then(|t| t.join().ok()).unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        Err(GitError::Failed {
            args: shown,
            stderr: stderr.trim().to_string(),
        })
    }
}

fn is_commit_id(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Fetches `repository` at `revision` (a commit, tag or anything git
/// resolves), else at `branch`'s tip, else at its default branch, into the
/// cache under `cache/git/<commit>/`, unless that commit is there already.
/// A branch is resolved with `git ls-remote` first, so a cached tip costs
/// no fetch. Only the tree is kept (LAVA's `history: false`).
///
/// # Errors
/// See [`GitError`]; each git call is bounded by `limit`.
pub fn fetch(
    repository: &str,
    branch: Option<&str>,
    revision: Option<&str>,
    cache: &Path,
    limit: Duration,
) -> Result<Checkout, GitError> {
    let trees = cache.join("git");
    std::fs::create_dir_all(&trees).map_err(|source| GitError::Cache {
        path: trees.clone(),
        source,
    })?;
    let cached = |commit: &str| {
        let dir = trees.join(commit);
        dir.is_dir().then(|| Checkout {
            dir,
            commit: commit.to_string(),
        })
    };
    // What to fetch, and the commit when it is known without fetching.
    let (want, known) = match revision {
        Some(rev) if is_commit_id(rev) => (rev.to_string(), Some(rev.to_lowercase())),
        Some(rev) => (rev.to_string(), None),
        None => {
            let reference = branch.map_or("HEAD".to_string(), |b| format!("refs/heads/{b}"));
            let listed = git(&["ls-remote", "--", repository, &reference], None, limit)?;
            let commit = listed
                .lines()
                .find_map(|l| l.split_whitespace().next().filter(|c| is_commit_id(c)))
                .ok_or_else(|| GitError::NotFound {
                    repository: repository.into(),
                    what: "branch",
                    name: branch.unwrap_or("HEAD").into(),
                })?;
            (reference, Some(commit.to_lowercase()))
        }
    };
    if let Some(hit) = known.as_deref().and_then(cached) {
        return Ok(hit);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(&trees)
        .map_err(|source| GitError::Cache {
            path: trees.clone(),
            source,
        })?;
    let work = tmp.path();
    git(&["init", "-q", "."], Some(work), limit)?;
    let fetched = match &known {
        // A commit id (or a branch tip just listed): fetch only it.
        Some(commit) => git(
            &["fetch", "-q", "--depth", "1", "--", repository, commit],
            Some(work),
            limit,
        )
        .or_else(|_| {
            // Servers that refuse to serve a bare commit: fetch everything.
            git(
                &[
                    "fetch",
                    "-q",
                    "--",
                    repository,
                    "+refs/heads/*:refs/remotes/origin/*",
                    "+refs/tags/*:refs/tags/*",
                ],
                Some(work),
                limit,
            )
        }),
        None => git(
            &[
                "fetch",
                "-q",
                "--",
                repository,
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            Some(work),
            limit,
        ),
    };
    fetched?;
    let target = known.clone().unwrap_or(want.clone());
    let commit = git(
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{target}^{{commit}}"),
        ],
        Some(work),
        limit,
    )
    .ok()
    .map(|s| s.trim().to_string())
    .filter(|c| is_commit_id(c))
    .ok_or_else(|| GitError::NotFound {
        repository: repository.into(),
        what: "revision",
        name: want.clone(),
    })?;
    if let Some(hit) = cached(&commit) {
        return Ok(hit);
    }
    git(
        &["-c", "advice.detachedHead=false", "checkout", "-q", &commit],
        Some(work),
        limit,
    )?;
    let dot_git = work.join(".git");
    std::fs::remove_dir_all(&dot_git).map_err(|source| GitError::Cache {
        path: dot_git,
        source,
    })?;
    let dir = trees.join(&commit);
    let work = tmp.keep();
    if std::fs::rename(&work, &dir).is_err() {
        // Another job cached the same commit meanwhile: use theirs.
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(Checkout { dir, commit })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, args: &[&str]) -> String {
        git(args, Some(dir), Duration::from_secs(30)).expect("git")
    }

    /// A repository with two commits on `main` and a tag on the first.
    fn repo() -> (tempfile::TempDir, String, String) {
        let t = tempfile::tempdir().expect("tmp");
        let d = t.path();
        run(d, &["init", "-q", "-b", "main", "."]);
        run(d, &["config", "user.email", "t@example.org"]);
        run(d, &["config", "user.name", "t"]);
        std::fs::write(d.join("a.yaml"), "one\n").expect("w");
        run(d, &["add", "."]);
        run(d, &["commit", "-q", "-m", "one"]);
        run(d, &["tag", "v1"]);
        let first = run(d, &["rev-parse", "HEAD"]).trim().to_string();
        std::fs::write(d.join("a.yaml"), "two\n").expect("w");
        run(d, &["commit", "-q", "-am", "two"]);
        let second = run(d, &["rev-parse", "HEAD"]).trim().to_string();
        (t, first, second)
    }

    #[test]
    fn fetches_branch_tag_and_commit_and_caches_by_commit() {
        let (r, first, second) = repo();
        let url = format!("file://{}", r.path().display());
        let cache = tempfile::tempdir().expect("cache");
        let limit = Duration::from_secs(60);
        let tip = fetch(&url, Some("main"), None, cache.path(), limit).expect("branch");
        assert_eq!(tip.commit, second);
        assert_eq!(
            std::fs::read_to_string(tip.dir.join("a.yaml")).expect("r"),
            "two\n"
        );
        assert!(!tip.dir.join(".git").exists(), "no history kept");
        let tag = fetch(&url, None, Some("v1"), cache.path(), limit).expect("tag");
        assert_eq!(tag.commit, first);
        assert_eq!(
            std::fs::read_to_string(tag.dir.join("a.yaml")).expect("r"),
            "one\n"
        );
        // A cached commit is served without the repository.
        drop(r);
        let again = fetch(&url, None, Some(&first), cache.path(), limit).expect("cached");
        assert_eq!(again.dir, tag.dir);
        assert!(fetch(&url, Some("main"), None, cache.path(), limit).is_err());
    }

    #[test]
    fn a_missing_branch_or_revision_says_so() {
        let (r, _, _) = repo();
        let url = format!("file://{}", r.path().display());
        let cache = tempfile::tempdir().expect("cache");
        let limit = Duration::from_secs(60);
        let e = fetch(&url, Some("nope"), None, cache.path(), limit).expect_err("branch");
        assert!(e.to_string().contains("no branch \"nope\""), "{e}");
        let e = fetch(&url, None, Some("v9"), cache.path(), limit).expect_err("rev");
        assert!(e.to_string().contains("no revision \"v9\""), "{e}");
    }
}
