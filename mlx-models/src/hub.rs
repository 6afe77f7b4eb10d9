//! Hugging Face Hub: resolve a model repo id (`org/name`) to a local snapshot directory
//! that [`crate::load::load_model_dir`] and [`crate::Tokenizer`] can read, the way
//! Python mlx-lm does with `snapshot_download`.
//!
//! [`snapshot`] looks in the local Hugging Face cache first, with its usual layout
//! (`<cache>/models--org--name/refs/<revision>` holds a commit hash; the files are under
//! `snapshots/<hash>/`, usually as symlinks into `blobs/`). When every file the model
//! needs is there, no network is used at all. Otherwise, unless offline, the missing
//! files are downloaded through the `hf-hub` crate into the same cache, so Python tools
//! and this crate share their downloads.
//!
//! The files a snapshot must hold: `config.json`, `tokenizer.json`, and the weights
//! (`model.safetensors.index.json` with every shard it lists, or else
//! `model.safetensors`). [`OPTIONAL_FILES`] are fetched when the repository has them.
//!
//! hf-hub supplies the cache layout (folder names, refs, `blobs/`, `snapshots/`), the HTTP
//! client with its token and user agent, file metadata, resumable downloads into blobs, and
//! the repository info type. What it lacks is added here, each with a test in
//! `tests/hub.rs`: timeouts on every request and on a stalled transfer
//! (`a_stalled_download_times_out`), typed errors that say what to do offline or when the Hub
//! refuses (`offline_with_missing_required_files_names_them`,
//! `refused_and_unreachable_hubs_fail_fast_with_a_clear_error`), per-file progress and reuse
//! of a blob another commit already has (`downloads_what_the_cache_lacks_then_works_offline`),
//! and checks of repo ids, refs and indexes (`malformed_index_or_ref_is_a_typed_error`).
//!
//! Environment, read by [`HubOptions::new`] and when resolving the cache directory,
//! with the meanings `huggingface_hub` gives them: `HF_HUB_OFFLINE`, `HF_TOKEN`,
//! `HF_TOKEN_PATH`, `HF_ENDPOINT`, `HF_HUB_DOWNLOAD_TIMEOUT`, `HF_HUB_CACHE`, `HF_HOME`.

use crate::error::{Error, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The revision used when none is given.
pub const DEFAULT_REVISION: &str = "main";
/// The Hub used when neither [`HubOptions::with_endpoint`] nor `HF_ENDPOINT` names one.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// How long a request may go without progress when `HF_HUB_DOWNLOAD_TIMEOUT` does not
/// say otherwise (the default of `huggingface_hub` too).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The model configuration; required.
pub const CONFIG_FILE: &str = "config.json";
/// The tokenizer; required.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Unsharded weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights; its `weight_map` names the shards.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Files fetched when the repository has them.
pub const OPTIONAL_FILES: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// Where and how [`snapshot`] looks for a model.
///
/// [`HubOptions::new`] (and `Default`) take their defaults from the environment like
/// `huggingface_hub` does; the `with_*` methods override them.
#[derive(Clone)]
pub struct HubOptions {
    revision: String,
    cache_dir: Option<PathBuf>,
    endpoint: Option<String>,
    offline: bool,
    token: Option<String>,
    timeout: Duration,
}

impl HubOptions {
    /// Defaults: revision `main`; the cache directory of [`default_cache_dir`]; the
    /// endpoint of `HF_ENDPOINT` or [`DEFAULT_ENDPOINT`]; offline when `HF_HUB_OFFLINE`
    /// is `1`, `true`, `yes` or `on`; the token of `HF_TOKEN`, else the token file
    /// (`HF_TOKEN_PATH`, else `$HF_HOME/token`, as `huggingface-cli login` writes it);
    /// the timeout of `HF_HUB_DOWNLOAD_TIMEOUT` (seconds) or [`DEFAULT_TIMEOUT`].
    pub fn new() -> Self {
        HubOptions {
            revision: DEFAULT_REVISION.to_owned(),
            cache_dir: None,
            endpoint: non_empty_env("HF_ENDPOINT"),
            offline: env_flag("HF_HUB_OFFLINE"),
            token: token_from_env(),
            timeout: non_empty_env("HF_HUB_DOWNLOAD_TIMEOUT")
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .unwrap_or(DEFAULT_TIMEOUT),
        }
    }

    /// The branch, tag or commit hash to resolve (default `main`).
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// The Hugging Face cache directory (the one holding `models--org--name`), instead
    /// of [`default_cache_dir`].
    pub fn with_cache_dir(mut self, cache_dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(cache_dir.into());
        self
    }

    /// The Hub to download from, e.g. a mirror (default `HF_ENDPOINT`, else
    /// [`DEFAULT_ENDPOINT`]).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Offline: use only the local cache, and fail with a typed error naming what is
    /// missing rather than download it.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// The access token for private and gated repositories; `None` sends none.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// How long a request may wait for the Hub (to connect, to answer, or between two
    /// pieces of a download) before failing.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The revision to resolve.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The cache directory set with [`HubOptions::with_cache_dir`], if any.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    /// The endpoint to download from.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT)
    }

    /// Whether only the local cache may be used.
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// Whether a token will be sent.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Default for HubOptions {
    /// Same as [`HubOptions::new`]: defaults from the environment.
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token.
        f.debug_struct("HubOptions")
            .field("revision", &self.revision)
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Progress of one file being downloaded, for [`snapshot`]'s callback: called when a
/// download starts (`downloaded == 0`), as data arrives, and when it ends
/// (`downloaded == total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownloadProgress<'a> {
    /// The file's name in the repository.
    pub file: &'a str,
    /// Bytes of it on disk so far.
    pub downloaded: u64,
    /// Its size in bytes.
    pub total: u64,
}

/// The directory holding `repo_id`'s model files at `options.revision()`, downloading
/// what the local cache lacks unless offline. See the [module docs](self) for the files.
///
/// `progress` is called on this thread for each file downloaded; files already in the
/// cache are not reported.
///
/// Errors: [`Error::InvalidRepoId`] for a malformed id; offline,
/// [`Error::HubNotCached`] when the revision has no snapshot and
/// [`Error::HubFileMissing`] naming the first missing file; [`Error::HubInvalidFile`]
/// for a malformed cached index or ref; online, [`Error::Hub`] when the Hub cannot be
/// reached within the timeout or refuses, and [`Error::HubFileMissing`] when the
/// repository lacks a required file.
pub fn snapshot(
    repo_id: &str,
    options: &HubOptions,
    progress: Option<&dyn Fn(&DownloadProgress<'_>)>,
) -> Result<PathBuf> {
    validate_repo_id(repo_id)?;
    let revision = options.revision.as_str();
    let ctx = Ctx {
        repo: repo_id,
        revision,
    };
    validate_revision(&ctx)?;
    let cache_dir = match &options.cache_dir {
        Some(dir) => dir.clone(),
        None => default_cache_dir().ok_or_else(|| {
            ctx.hub("cannot find the Hugging Face cache directory: set HF_HUB_CACHE or HF_HOME")
        })?,
    };
    let cache = Cache::new(cache_dir.clone());

    // 1. The local cache.
    let local = match cached_commit(&ctx, &cache)? {
        None => Local::NotCached(format!(
            "no refs/{revision} in {}",
            ctx.repo_dir(&cache).display()
        )),
        Some(commit) => {
            let dir = ctx.snapshot_dir(&cache, &commit);
            if dir.is_dir() {
                check_snapshot(&ctx, &dir)?
            } else {
                Local::NotCached(format!("no snapshot directory {}", dir.display()))
            }
        }
    };
    let missing = match local {
        Local::Complete(dir) => return Ok(dir),
        Local::NotCached(reason) if options.offline => {
            return Err(Error::HubNotCached {
                repo: ctx.repo.to_owned(),
                revision: revision.to_owned(),
                cache_dir,
                reason: format!("{reason} (offline mode)"),
            })
        }
        Local::Missing { file, reason } if options.offline => {
            return Err(ctx.file_missing(&file, format!("{reason} (offline mode)")))
        }
        Local::NotCached(reason) => reason,
        Local::Missing { file, reason } => format!("missing `{file}`: {reason}"),
    };

    // 2. The Hub.
    download_snapshot(&ctx, options, &cache, &missing, progress)
}

/// `path_or_repo` itself when it is an existing directory, else the [`snapshot`] of the
/// Hugging Face repo it names: the model argument of a command line.
pub fn resolve_model_dir(
    path_or_repo: &str,
    options: &HubOptions,
    progress: Option<&dyn Fn(&DownloadProgress<'_>)>,
) -> Result<PathBuf> {
    let path = Path::new(path_or_repo);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Err(Error::InvalidRepoId { repo_id, reason }) = validate_repo_id(path_or_repo) {
        return Err(Error::InvalidRepoId {
            repo_id,
            reason: format!("{reason}; nor is it a local directory"),
        });
    }
    snapshot(path_or_repo, options, progress)
}

/// Checks that `repo_id` is a Hub model id: `org/name`, each part of ASCII letters,
/// digits, `-`, `_` and `.`, not starting or ending with `-` or `.`, without `--` or
/// `..`, each at most 96 characters (the rules of `huggingface_hub`).
pub fn validate_repo_id(repo_id: &str) -> Result<()> {
    let invalid = |reason: &str| {
        Err(Error::InvalidRepoId {
            repo_id: repo_id.to_owned(),
            reason: reason.to_owned(),
        })
    };
    let mut parts = repo_id.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return invalid("expected `org/name`, with exactly one `/`");
    };
    for (what, part) in [("organization", org), ("name", name)] {
        if part.is_empty() {
            return invalid(&format!("the {what} is empty"));
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return invalid(&format!(
                "the {what} holds {c:?}; only ASCII letters, digits, `-`, `_` and `.` may"
            ));
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return invalid(&format!("the {what} starts or ends with `-` or `.`"));
        }
        if part.len() > 96 {
            return invalid(&format!("the {what} is longer than 96 characters"));
        }
    }
    if repo_id.contains("--") || repo_id.contains("..") {
        return invalid("`--` and `..` are not allowed");
    }
    Ok(())
}

/// The Hugging Face cache directory, as `huggingface_hub` finds it: `HF_HUB_CACHE`,
/// else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; `None` when
/// none of these is set and there is no home directory.
pub fn default_cache_dir() -> Option<PathBuf> {
    non_empty_env_path("HF_HUB_CACHE")
        .or_else(|| non_empty_env_path("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| hf_home().map(|home| home.join("hub")))
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    non_empty_env_path("HF_HOME").or_else(|| {
        non_empty_env_path("XDG_CACHE_HOME")
            .or_else(|| home_dir().map(|h| h.join(".cache")))
            .map(|cache| cache.join("huggingface"))
    })
}

fn home_dir() -> Option<PathBuf> {
    non_empty_env_path("HOME").or_else(|| non_empty_env_path("USERPROFILE"))
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn non_empty_env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `huggingface_hub`'s truth values: `1`, `ON`, `YES`, `TRUE`, in any case.
fn env_flag(name: &str) -> bool {
    non_empty_env(name)
        .is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// `HF_TOKEN`, else the legacy `HUGGING_FACE_HUB_TOKEN`, else the token file.
fn token_from_env() -> Option<String> {
    if let Some(token) =
        non_empty_env("HF_TOKEN").or_else(|| non_empty_env("HUGGING_FACE_HUB_TOKEN"))
    {
        return Some(token);
    }
    if let Some(path) = non_empty_env_path("HF_TOKEN_PATH") {
        let token = std::fs::read_to_string(path).ok()?;
        let token = token.trim();
        return (!token.is_empty()).then(|| token.to_owned());
    }
    // hf-hub reads `<cache>/../token`, i.e. `$HF_HOME/token`.
    hf_home().and_then(|home| Cache::new(home.join("hub")).token())
}

/// The repo and revision every error names.
struct Ctx<'a> {
    repo: &'a str,
    revision: &'a str,
}

impl Ctx<'_> {
    fn hub(&self, message: impl Into<String>) -> Error {
        Error::Hub {
            repo: self.repo.to_owned(),
            revision: self.revision.to_owned(),
            message: message.into(),
        }
    }

    fn file_missing(&self, file: &str, reason: impl Into<String>) -> Error {
        Error::HubFileMissing {
            repo: self.repo.to_owned(),
            revision: self.revision.to_owned(),
            file: file.to_owned(),
            reason: reason.into(),
        }
    }

    fn invalid_file(&self, file: &str, path: &Path, message: impl Into<String>) -> Error {
        Error::HubInvalidFile {
            repo: self.repo.to_owned(),
            revision: self.revision.to_owned(),
            file: file.to_owned(),
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    fn hf_repo(&self, revision: &str) -> Repo {
        Repo::with_revision(self.repo.to_owned(), RepoType::Model, revision.to_owned())
    }

    /// `<cache>/models--org--name`.
    fn repo_dir(&self, cache: &Cache) -> PathBuf {
        cache.path().join(self.hf_repo(self.revision).folder_name())
    }

    /// `<cache>/models--org--name/snapshots/<commit>`.
    fn snapshot_dir(&self, cache: &Cache, commit: &str) -> PathBuf {
        cache.repo(self.hf_repo(commit)).pointer_path(commit)
    }
}

/// A revision is a branch, tag or commit; it becomes a path under `refs/`, so nothing
/// that could leave that directory is let through.
fn validate_revision(ctx: &Ctx<'_>) -> Result<()> {
    let rev = ctx.revision;
    let bad = rev.is_empty()
        || rev.len() > 255
        || rev.starts_with(['/', '.'])
        || rev.ends_with('/')
        || rev.contains("..")
        || rev.contains("//")
        || rev
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "\\~^:?*[".contains(c));
    if bad {
        return Err(ctx.hub(format!(
            "invalid revision {rev:?}: expected a branch, tag or commit hash"
        )));
    }
    Ok(())
}

/// A full commit hash: 40 lowercase hex digits.
fn is_commit_hash(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The commit the cache maps the revision to: the revision itself when it is a commit
/// hash, else the content of `refs/<revision>`; `None` when there is no such ref.
fn cached_commit(ctx: &Ctx<'_>, cache: &Cache) -> Result<Option<String>> {
    if is_commit_hash(ctx.revision) {
        return Ok(Some(ctx.revision.to_owned()));
    }
    let ref_file = format!("refs/{}", ctx.revision);
    let path = ctx.repo_dir(cache).join(&ref_file);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // A directory (`refs/pr` for revision `pr`) is no ref either.
        Err(_) if path.is_dir() => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let commit = text.trim();
    if !is_commit_hash(commit) {
        return Err(ctx.invalid_file(
            &ref_file,
            &path,
            format!("holds {commit:?}, not a 40-digit commit hash"),
        ));
    }
    Ok(Some(commit.to_owned()))
}

enum Local {
    /// Every needed file is in this snapshot directory.
    Complete(PathBuf),
    /// No snapshot for the revision; why.
    NotCached(String),
    /// The snapshot lacks `file`.
    Missing { file: String, reason: String },
}

/// Whether the snapshot directory `dir` holds every file the model needs.
fn check_snapshot(ctx: &Ctx<'_>, dir: &Path) -> Result<Local> {
    let not_cached = "not in the local cache".to_owned();
    for file in [CONFIG_FILE, TOKENIZER_FILE] {
        if !dir.join(file).is_file() {
            return Ok(Local::Missing {
                file: file.to_owned(),
                reason: not_cached,
            });
        }
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        for shard in read_index(ctx, &index)? {
            if !dir.join(&shard).is_file() {
                return Ok(Local::Missing {
                    file: shard,
                    reason: format!("listed in {WEIGHTS_INDEX_FILE} but not in the local cache"),
                });
            }
        }
    } else if !dir.join(WEIGHTS_FILE).is_file() {
        return Ok(Local::Missing {
            file: WEIGHTS_FILE.to_owned(),
            reason: format!(
                "neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} is in the local cache"
            ),
        });
    }
    Ok(Local::Complete(dir.to_path_buf()))
}

/// The shard files a `model.safetensors.index.json` lists, sorted and deduplicated.
fn read_index(ctx: &Ctx<'_>, path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let invalid = |message: String| ctx.invalid_file(WEIGHTS_INDEX_FILE, path, message);
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let index: Index = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if index.weight_map.is_empty() {
        return Err(invalid("`weight_map` is empty".to_owned()));
    }
    let shards: BTreeSet<String> = index.weight_map.into_values().collect();
    for shard in &shards {
        let safe = !shard.is_empty()
            && !shard.contains('\\')
            && !shard.starts_with('/')
            && shard
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !safe {
            return Err(invalid(format!(
                "shard name {shard:?} is not a file name inside the repository"
            )));
        }
    }
    Ok(shards.into_iter().collect())
}

/// Downloads what the cache lacks for the revision and returns the complete snapshot.
/// `missing` says what the local cache lacked, for errors.
fn download_snapshot(
    ctx: &Ctx<'_>,
    options: &HubOptions,
    cache: &Cache,
    missing: &str,
    progress: Option<&dyn Fn(&DownloadProgress<'_>)>,
) -> Result<PathBuf> {
    let endpoint = options.endpoint().trim_end_matches('/').to_owned();
    let timeout = options.timeout;
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(endpoint.clone())
        .with_token(options.token.clone())
        .with_progress(false)
        .with_retries(2)
        .with_user_agent("mlx-models", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| ctx.hub(format!("cannot set up the HTTP client: {e}")))?;
    let net = Net {
        ctx,
        endpoint: &endpoint,
        timeout,
        has_token: options.token.is_some(),
        missing,
    };

    // Which commit the revision is now, and which files it has. ureq's per-request
    // timeouts bound this request; hf-hub's downloads have none, see `fetch`.
    let response = api
        .repo(ctx.hf_repo(ctx.revision))
        .info_request()
        .config()
        .timeout_connect(Some(timeout))
        .timeout_global(Some(timeout))
        .build()
        .call();
    let text = response
        .and_then(|mut response| response.body_mut().read_to_string())
        .map_err(|e| ctx.hub(net.describe(&e, "asking for the file list")))?;
    let info: RepoInfo = serde_json::from_str(&text).map_err(|e| {
        ctx.hub(format!(
            "unexpected answer from {endpoint} to the file list request: {e}"
        ))
    })?;
    let commit = info.sha;
    if !is_commit_hash(&commit) {
        return Err(ctx.hub(format!(
            "{endpoint} named no valid commit for the revision (got {commit:?})"
        )));
    }
    let remote: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let not_in_repo = |file: &str| {
        ctx.file_missing(
            file,
            format!("the repository has no such file at commit {commit}"),
        )
    };

    for file in [CONFIG_FILE, TOKENIZER_FILE] {
        if !remote.contains(file) {
            return Err(not_in_repo(file));
        }
    }
    let sharded = remote.contains(WEIGHTS_INDEX_FILE);
    if !sharded && !remote.contains(WEIGHTS_FILE) {
        return Err(ctx.file_missing(
            WEIGHTS_FILE,
            format!("the repository has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} at commit {commit}"),
        ));
    }

    // Small files first, so a bad index fails before gigabytes are fetched.
    let snapshot_dir = ctx.snapshot_dir(cache, &commit);
    let ref_of_commit = ctx.repo_dir(cache).join("refs").join(&commit);
    let had_ref_of_commit = ref_of_commit.exists();
    let fetcher = Fetcher {
        net: &net,
        api: &api,
        cache,
        commit: &commit,
        dir: &snapshot_dir,
        progress,
    };
    let mut files: Vec<String> = [CONFIG_FILE, TOKENIZER_FILE]
        .iter()
        .map(|f| (*f).to_owned())
        .collect();
    files.extend(
        OPTIONAL_FILES
            .iter()
            .filter(|f| remote.contains(**f))
            .map(|f| (*f).to_owned()),
    );
    if sharded {
        fetcher.ensure(WEIGHTS_INDEX_FILE)?;
        for shard in read_index(ctx, &snapshot_dir.join(WEIGHTS_INDEX_FILE))? {
            if !remote.contains(shard.as_str()) {
                return Err(ctx.file_missing(
                    &shard,
                    format!("listed in {WEIGHTS_INDEX_FILE} but the repository has no such file at commit {commit}"),
                ));
            }
            files.push(shard);
        }
    } else {
        files.push(WEIGHTS_FILE.to_owned());
    }
    // Shards last: config and tokenizer errors surface before the big downloads.
    for file in &files {
        fetcher.ensure(file)?;
    }

    // hf-hub records the commit it downloaded as a ref named after itself;
    // huggingface_hub writes no such ref, so drop it unless it was there before.
    if !had_ref_of_commit {
        let _ = std::fs::remove_file(&ref_of_commit);
    }
    let local = check_snapshot(ctx, &snapshot_dir)?;
    let dir = match local {
        Local::Complete(dir) => dir,
        Local::NotCached(reason) => return Err(ctx.hub(format!("after downloading: {reason}"))),
        Local::Missing { file, reason } => {
            return Err(ctx.file_missing(&file, format!("after downloading: {reason}")))
        }
    };
    // Point the branch or tag at the commit now that its snapshot is complete.
    if ctx.revision != commit {
        cache
            .repo(ctx.hf_repo(ctx.revision))
            .create_ref(&commit)
            .map_err(|e| Error::io(ctx.repo_dir(cache).join("refs").join(ctx.revision), e))?;
    }
    Ok(dir)
}

/// What network errors are described with.
struct Net<'a> {
    ctx: &'a Ctx<'a>,
    endpoint: &'a str,
    timeout: Duration,
    has_token: bool,
    /// What the local cache lacked.
    missing: &'a str,
}

impl Net<'_> {
    /// A message for a failed request, saying what to do about it.
    fn describe(&self, error: &ureq::Error, doing: &str) -> String {
        let (endpoint, secs) = (self.endpoint, self.timeout.as_secs_f64());
        let offline_hint = format!(
            "the local cache has no complete copy ({}); set HF_HUB_OFFLINE=1 once it has one, or check the network",
            self.missing
        );
        match error {
            ureq::Error::StatusCode(code @ (401 | 403)) => {
                let token = if self.has_token {
                    "the token in use (HF_TOKEN) has no access to it"
                } else {
                    "no token was sent; set HF_TOKEN (or log in with `huggingface-cli login`)"
                };
                format!(
                    "{doing}: HTTP {code} from {endpoint}: the repository does not exist, or is private or gated \
                     (accept its terms on the Hub); {token}"
                )
            }
            ureq::Error::StatusCode(404) => {
                format!("{doing}: HTTP 404 from {endpoint}: no such repository, revision or file")
            }
            ureq::Error::StatusCode(code) => format!("{doing}: HTTP {code} from {endpoint}"),
            ureq::Error::Timeout(which) => {
                format!("{doing}: no answer from {endpoint} within {secs}s (timeout: {which:?}); {offline_hint}")
            }
            ureq::Error::HostNotFound => {
                format!("{doing}: cannot resolve the host of {endpoint}; {offline_hint}")
            }
            ureq::Error::ConnectionFailed | ureq::Error::Io(_) => {
                format!("{doing}: cannot reach {endpoint}: {error}; {offline_hint}")
            }
            other => format!("{doing}: request to {endpoint} failed: {other}"),
        }
    }

    fn describe_api(&self, error: &ApiError, doing: &str) -> String {
        match error {
            ApiError::RequestError(e) => self.describe(e, doing),
            ApiError::TooManyRetries(e) => {
                format!("{} (after retries)", self.describe_api(e, doing))
            }
            other => format!("{doing}: {other}"),
        }
    }
}

/// Downloads files of one commit into the cache.
struct Fetcher<'a> {
    net: &'a Net<'a>,
    api: &'a Api,
    cache: &'a Cache,
    commit: &'a str,
    dir: &'a Path,
    progress: Option<&'a dyn Fn(&DownloadProgress<'_>)>,
}

/// What the download thread reports.
enum Event {
    /// A (re)start of the transfer; the file's size.
    Start(u64),
    /// More bytes written.
    Advance(u64),
    /// The result: the pointer path, or why not.
    Done(std::result::Result<PathBuf, FetchError>),
}

impl Fetcher<'_> {
    /// Makes sure `snapshots/<commit>/<file>` exists, downloading it if needed.
    ///
    /// hf-hub's ureq agent has no timeouts, so the transfer runs on its own thread and
    /// this one gives up when that thread reports nothing (no byte, no answer) for the
    /// timeout; the abandoned thread ends with its connection.
    fn ensure(&self, file: &str) -> Result<()> {
        let ctx = self.net.ctx;
        let target = self.dir.join(file);
        if target.is_file() {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel();
        let api = self.api.clone();
        let cache = self.cache.clone();
        let repo = ctx.hf_repo(self.commit);
        let name = file.to_owned();
        let done = tx.clone();
        std::thread::Builder::new()
            .name(format!("hf-download {file}"))
            .spawn(move || {
                let progress = ChannelProgress {
                    tx,
                    pending: 0,
                    last: Instant::now(),
                };
                let result = fetch(&api, &cache, repo, &name, progress);
                let _ = done.send(Event::Done(result));
            })
            .map_err(|e| ctx.hub(format!("cannot start a download thread: {e}")))?;

        let doing = format!("downloading `{file}`");
        let (mut downloaded, mut total) = (0u64, 0u64);
        let report = |downloaded: u64, total: u64| {
            if let Some(progress) = self.progress {
                progress(&DownloadProgress {
                    file,
                    downloaded,
                    total,
                });
            }
        };
        let path = loop {
            match rx.recv_timeout(self.net.timeout) {
                Ok(Event::Start(size)) => {
                    (downloaded, total) = (0, size);
                    report(downloaded, total);
                }
                Ok(Event::Advance(n)) => {
                    downloaded = downloaded.saturating_add(n);
                    report(downloaded, total);
                }
                Ok(Event::Done(Ok(path))) => break path,
                Ok(Event::Done(Err(e))) => {
                    return Err(ctx.hub(match e {
                        FetchError::Api(e) => self.net.describe_api(&e, &doing),
                        FetchError::Other(e) => format!("{doing}: {e}"),
                    }))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(ctx.hub(format!(
                        "{doing}: nothing from {} for {}s; the network may be down or blocked; {}",
                        self.net.endpoint,
                        self.net.timeout.as_secs_f64(),
                        "set HF_HUB_OFFLINE=1 to use only the local cache, or raise HF_HUB_DOWNLOAD_TIMEOUT"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ctx.hub(format!("{doing}: the download thread stopped without a result")))
                }
            }
        };
        if path != target || !target.is_file() {
            return Err(ctx.hub(format!(
                "{doing}: hf-hub stored it at {}, expected {}",
                path.display(),
                target.display()
            )));
        }
        Ok(())
    }
}

/// Why the download thread failed.
enum FetchError {
    Api(ApiError),
    Other(String),
}

/// Downloads `file` of `repo` (whose revision is a commit) into the cache; a blob of the
/// same content already there (another revision of the same file) is linked, not fetched
/// again. Runs on the download thread.
fn fetch(
    api: &Api,
    cache: &Cache,
    repo: Repo,
    file: &str,
    mut progress: ChannelProgress,
) -> std::result::Result<PathBuf, FetchError> {
    use hf_hub::api::Progress as _;
    let api_repo = api.repo(repo.clone());
    let metadata = api.metadata(&api_repo.url(file)).map_err(FetchError::Api)?;
    let cache_repo = cache.repo(repo);
    let blob = cache_repo.blob_path(metadata.etag());
    let pointer = cache_repo.pointer_path(metadata.commit_hash()).join(file);
    let size = metadata.size() as u64;
    if blob
        .metadata()
        .is_ok_and(|m| m.is_file() && m.len() == size)
    {
        link_blob(&blob, &pointer, file)
            .map_err(|e| FetchError::Other(format!("{}: {e}", pointer.display())))?;
        progress.init(metadata.size(), file);
        progress.update(metadata.size());
        progress.finish();
        return Ok(pointer);
    }
    api_repo
        .download_with_progress(file, progress)
        .map_err(FetchError::Api)
}

/// Makes `pointer` (`snapshots/<commit>/<file>`) refer to `blob` (`blobs/<etag>`): a
/// relative symlink as the Hub's layout has, or a copy where symlinks are unavailable.
fn link_blob(blob: &Path, pointer: &Path, file: &str) -> std::io::Result<()> {
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent)?;
    }
    #[cfg(unix)]
    {
        // From snapshots/<commit>/<dirs of file>/ up to the repo directory.
        let mut relative = PathBuf::new();
        for _ in 0..(file.split('/').count() + 1) {
            relative.push("..");
        }
        relative.push("blobs");
        relative.push(blob.file_name().unwrap_or_default());
        let _ = std::fs::remove_file(pointer);
        std::os::unix::fs::symlink(relative, pointer)
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, pointer).map(|_| ())
    }
}

/// hf-hub's progress hook, forwarding to the waiting thread at most every 100 ms or
/// MiB, which is also what tells that thread the transfer is alive.
struct ChannelProgress {
    tx: mpsc::Sender<Event>,
    pending: u64,
    last: Instant,
}

impl hf_hub::api::Progress for ChannelProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.pending = 0;
        self.last = Instant::now();
        let _ = self.tx.send(Event::Start(size as u64));
    }

    fn update(&mut self, size: usize) {
        self.pending += size as u64;
        if self.pending >= 1 << 20 || self.last.elapsed() >= Duration::from_millis(100) {
            let _ = self.tx.send(Event::Advance(self.pending));
            self.pending = 0;
            self.last = Instant::now();
        }
    }

    fn finish(&mut self) {
        if self.pending > 0 {
            let _ = self.tx.send(Event::Advance(self.pending));
            self.pending = 0;
        }
    }
}
