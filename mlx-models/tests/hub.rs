//! `mlx_models::hub` on a Hugging Face cache built on disk in a temporary directory, and
//! on a fake Hub served on the loopback interface: no test reaches the network, and none
//! writes outside its temporary directory. Options are always explicit (offline, token,
//! endpoint, cache directory) since tests run in parallel and must not depend on the
//! process environment.

use mlx_models::error::Error;
use mlx_models::hub::{self, DownloadProgress, HubOptions};
use mlx_models::tap::Tap;
use mlx_rs::Array;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REPO: &str = "test-org/tiny-llama";
/// An endpoint nothing listens on (the discard port of the loopback interface): should a
/// test's options ever let a request through, it fails at once instead of going out.
const NOWHERE: &str = "http://127.0.0.1:9";

fn commit(n: u8) -> String {
    format!("{n:02x}").repeat(20)
}

const SHARD_1: &str = "model-00001-of-00002.safetensors";
const SHARD_2: &str = "model-00002-of-00002.safetensors";

fn index_json(shards: &[&str]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("w{i}"), serde_json::Value::from(*s)))
        .collect();
    serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map }).to_string()
}

/// A Hugging Face cache in a temporary directory: `<tmp>/hub/models--test-org--tiny-llama`.
struct FakeCache {
    tmp: tempfile::TempDir,
    blob_counter: std::cell::Cell<usize>,
}

impl FakeCache {
    fn new() -> Self {
        FakeCache {
            tmp: tempfile::tempdir().expect("tempdir"),
            blob_counter: Default::default(),
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.tmp.path().join("hub")
    }

    fn repo_dir(&self) -> PathBuf {
        self.cache_dir().join("models--test-org--tiny-llama")
    }

    fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.repo_dir().join("snapshots").join(commit)
    }

    fn set_ref(&self, revision: &str, commit: &str) {
        let path = self.repo_dir().join("refs").join(revision);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // The Hub writes no newline; tolerate one anyway.
        std::fs::write(path, format!("{commit}\n")).unwrap();
    }

    /// `snapshots/<commit>/<name>`, as a symlink into `blobs/` like the real cache.
    fn add_file(&self, commit: &str, name: &str, content: &[u8]) {
        let pointer = self.snapshot_dir(commit).join(name);
        std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
        #[cfg(unix)]
        {
            let n = self.blob_counter.get();
            self.blob_counter.set(n + 1);
            let blob_name = format!("blob{n:04}");
            let blobs = self.repo_dir().join("blobs");
            std::fs::create_dir_all(&blobs).unwrap();
            std::fs::write(blobs.join(&blob_name), content).unwrap();
            std::os::unix::fs::symlink(Path::new("../../blobs").join(blob_name), &pointer).unwrap();
        }
        #[cfg(not(unix))]
        std::fs::write(&pointer, content).unwrap();
    }

    /// A complete sharded snapshot.
    fn add_sharded_snapshot(&self, commit: &str) {
        self.add_file(commit, "config.json", b"{}");
        self.add_file(commit, "tokenizer.json", b"{}");
        self.add_file(commit, "tokenizer_config.json", b"{}");
        self.add_file(
            commit,
            "model.safetensors.index.json",
            index_json(&[SHARD_1, SHARD_2, SHARD_1]).as_bytes(),
        );
        self.add_file(commit, SHARD_1, b"shard 1");
        self.add_file(commit, SHARD_2, b"shard 2");
    }

    /// Offline options on this cache, with no token and an endpoint nothing serves.
    fn offline(&self) -> HubOptions {
        HubOptions::new()
            .with_cache_dir(self.cache_dir())
            .with_offline(true)
            .with_token(None)
            .with_endpoint(NOWHERE)
    }
}

#[test]
fn resolves_a_branch_through_refs() {
    let cache = FakeCache::new();
    cache.add_sharded_snapshot(&commit(1));
    cache.set_ref("main", &commit(1));
    let dir = hub::snapshot(REPO, &cache.offline(), None).expect("snapshot");
    assert_eq!(dir, cache.snapshot_dir(&commit(1)));
    for file in ["config.json", "tokenizer.json", SHARD_1, SHARD_2] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    // The default revision is main.
    let dir = hub::snapshot(REPO, &cache.offline().with_revision("main"), None).expect("snapshot");
    assert_eq!(dir, cache.snapshot_dir(&commit(1)));
}

#[test]
fn a_commit_hash_revision_maps_to_its_snapshot_without_refs() {
    let cache = FakeCache::new();
    cache.add_sharded_snapshot(&commit(7));
    let dir =
        hub::snapshot(REPO, &cache.offline().with_revision(commit(7)), None).expect("snapshot");
    assert_eq!(dir, cache.snapshot_dir(&commit(7)));

    // A hash with no snapshot: not cached.
    match hub::snapshot(REPO, &cache.offline().with_revision(commit(8)), None) {
        Err(Error::HubNotCached { repo, revision, .. }) => {
            assert_eq!(repo, REPO);
            assert_eq!(revision, commit(8));
        }
        other => panic!("expected HubNotCached, got {other:?}"),
    }
}

#[test]
fn other_revisions_follow_their_own_refs() {
    let cache = FakeCache::new();
    cache.add_sharded_snapshot(&commit(1));
    cache.set_ref("main", &commit(1));
    // A tag with unsharded weights.
    cache.add_file(&commit(2), "config.json", b"{}");
    cache.add_file(&commit(2), "tokenizer.json", b"{}");
    cache.add_file(&commit(2), "model.safetensors", b"weights");
    cache.set_ref("v1.0", &commit(2));
    // A pull-request ref, nested under refs/.
    cache.add_sharded_snapshot(&commit(3));
    cache.set_ref("refs/pr/1", &commit(3));

    let opts = cache.offline();
    assert_eq!(
        hub::snapshot(REPO, &opts.clone().with_revision("v1.0"), None).unwrap(),
        cache.snapshot_dir(&commit(2))
    );
    assert_eq!(
        hub::snapshot(REPO, &opts.clone().with_revision("refs/pr/1"), None).unwrap(),
        cache.snapshot_dir(&commit(3))
    );
    assert_eq!(
        hub::snapshot(REPO, &opts.clone(), None).unwrap(),
        cache.snapshot_dir(&commit(1))
    );
    // An unknown branch.
    assert!(matches!(
        hub::snapshot(REPO, &opts.with_revision("dev"), None),
        Err(Error::HubNotCached { ref revision, .. }) if revision == "dev"
    ));
}

#[test]
fn offline_with_a_missing_shard_names_it() {
    let cache = FakeCache::new();
    let c = commit(1);
    cache.add_file(&c, "config.json", b"{}");
    cache.add_file(&c, "tokenizer.json", b"{}");
    cache.add_file(
        &c,
        "model.safetensors.index.json",
        index_json(&[SHARD_1, SHARD_2]).as_bytes(),
    );
    cache.add_file(&c, SHARD_1, b"shard 1");
    cache.set_ref("main", &c);
    let err = hub::snapshot(REPO, &cache.offline(), None).unwrap_err();
    let message = err.to_string();
    match err {
        Error::HubFileMissing {
            repo,
            revision,
            file,
            ..
        } => {
            assert_eq!(
                (repo.as_str(), revision.as_str(), file.as_str()),
                (REPO, "main", SHARD_2)
            );
        }
        other => panic!("expected HubFileMissing, got {other:?}"),
    }
    for part in [REPO, "main", SHARD_2, "offline"] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }

    // A dangling blob link counts as missing too.
    #[cfg(unix)]
    {
        cache.add_file(&c, SHARD_2, b"shard 2");
        assert!(hub::snapshot(REPO, &cache.offline(), None).is_ok());
        let link = cache.snapshot_dir(&c).join(SHARD_2);
        let blob = link
            .parent()
            .unwrap()
            .join(std::fs::read_link(&link).unwrap());
        std::fs::remove_file(blob).unwrap();
        assert!(matches!(
            hub::snapshot(REPO, &cache.offline(), None),
            Err(Error::HubFileMissing { ref file, .. }) if file == SHARD_2
        ));
    }
}

#[test]
fn offline_with_missing_required_files_names_them() {
    let cache = FakeCache::new();
    let c = commit(1);
    cache.set_ref("main", &c);
    cache.add_file(&c, "config.json", b"{}");
    let missing = |cache: &FakeCache| match hub::snapshot(REPO, &cache.offline(), None) {
        Err(Error::HubFileMissing { file, .. }) => file,
        other => panic!("expected HubFileMissing, got {other:?}"),
    };
    assert_eq!(missing(&cache), "tokenizer.json");
    cache.add_file(&c, "tokenizer.json", b"{}");
    // Neither model.safetensors nor an index.
    assert_eq!(missing(&cache), "model.safetensors");
    cache.add_file(&c, "model.safetensors", b"weights");
    assert_eq!(
        hub::snapshot(REPO, &cache.offline(), None).unwrap(),
        cache.snapshot_dir(&c)
    );
}

#[test]
fn missing_refs_is_not_cached() {
    let cache = FakeCache::new();
    // A snapshot exists, but no ref points at it.
    cache.add_sharded_snapshot(&commit(1));
    let err = hub::snapshot(REPO, &cache.offline(), None).unwrap_err();
    let message = err.to_string();
    match err {
        Error::HubNotCached {
            repo,
            revision,
            cache_dir,
            ..
        } => {
            assert_eq!((repo.as_str(), revision.as_str()), (REPO, "main"));
            assert_eq!(cache_dir, cache.cache_dir());
        }
        other => panic!("expected HubNotCached, got {other:?}"),
    }
    assert!(message.contains("refs/main"), "{message}");

    // An empty cache directory, or none at all.
    let empty = FakeCache::new();
    assert!(matches!(
        hub::snapshot(REPO, &empty.offline(), None),
        Err(Error::HubNotCached { .. })
    ));
}

#[test]
fn malformed_index_or_ref_is_a_typed_error() {
    let cache = FakeCache::new();
    let c = commit(1);
    cache.add_file(&c, "config.json", b"{}");
    cache.add_file(&c, "tokenizer.json", b"{}");
    cache.add_file(
        &c,
        "model.safetensors.index.json",
        b"{\"weight_map\": {\"a\": ",
    );
    cache.set_ref("main", &c);
    match hub::snapshot(REPO, &cache.offline(), None) {
        Err(Error::HubInvalidFile {
            repo,
            revision,
            file,
            path,
            ..
        }) => {
            assert_eq!((repo.as_str(), revision.as_str()), (REPO, "main"));
            assert_eq!(file, "model.safetensors.index.json");
            assert_eq!(
                path,
                cache.snapshot_dir(&c).join("model.safetensors.index.json")
            );
        }
        other => panic!("expected HubInvalidFile, got {other:?}"),
    }

    // Valid JSON but the wrong shape, an empty map, or a shard outside the snapshot.
    for (i, index) in [
        r#"{"weights": {}}"#,
        r#"{"weight_map": {}}"#,
        r#"{"weight_map": {"a": "../../../escape.safetensors"}}"#,
        r#"{"weight_map": {"a": "/etc/passwd"}}"#,
    ]
    .iter()
    .enumerate()
    {
        let c = commit(10 + i as u8);
        cache.add_file(&c, "config.json", b"{}");
        cache.add_file(&c, "tokenizer.json", b"{}");
        cache.add_file(&c, "model.safetensors.index.json", index.as_bytes());
        let result = hub::snapshot(REPO, &cache.offline().with_revision(c), None);
        assert!(
            matches!(result, Err(Error::HubInvalidFile { .. })),
            "{index}: {result:?}"
        );
    }

    // A ref that holds no commit hash.
    cache.set_ref("broken", "not-a-hash");
    match hub::snapshot(REPO, &cache.offline().with_revision("broken"), None) {
        Err(Error::HubInvalidFile { file, .. }) => assert_eq!(file, "refs/broken"),
        other => panic!("expected HubInvalidFile, got {other:?}"),
    }
}

#[test]
fn invalid_repo_ids_and_revisions_are_rejected() {
    let cache = FakeCache::new();
    for id in [
        "",
        "gpt2",
        "org/",
        "/name",
        "org/name/extra",
        "org//name",
        "../name",
        "org/..",
        "org/na--me",
        "org/na..me",
        "-org/name",
        "org/name.",
        "org/na me",
        "org/na\u{e9}me",
        "org\\name",
        "org/name\n",
    ] {
        match hub::snapshot(id, &cache.offline(), None) {
            Err(Error::InvalidRepoId { repo_id, reason }) => {
                assert_eq!(repo_id, id);
                assert!(!reason.is_empty());
            }
            other => panic!("{id:?}: expected InvalidRepoId, got {other:?}"),
        }
    }
    let long = format!("org/{}", "n".repeat(97));
    assert!(matches!(
        hub::validate_repo_id(&long),
        Err(Error::InvalidRepoId { .. })
    ));
    for id in [
        "mlx-community/Llama-3.2-1B-Instruct-4bit",
        "HuggingFaceTB/SmolLM2-135M",
        "a/b",
        "org_1/v0.1_x",
    ] {
        hub::validate_repo_id(id).unwrap_or_else(|e| panic!("{id}: {e}"));
    }

    for revision in [
        "",
        "../../etc",
        "/abs",
        "main/",
        "a b",
        "a\\b",
        "refs//pr",
        "x\0y",
    ] {
        match hub::snapshot(REPO, &cache.offline().with_revision(revision), None) {
            Err(Error::Hub {
                repo,
                revision: r,
                message,
            }) => {
                assert_eq!((repo.as_str(), r.as_str()), (REPO, revision));
                assert!(message.contains("invalid revision"), "{message}");
            }
            other => panic!("{revision:?}: expected Hub, got {other:?}"),
        }
    }
    // Nothing was written.
    assert!(!cache.cache_dir().exists());
}

#[test]
fn resolve_model_dir_takes_a_directory_or_a_repo_id() {
    let cache = FakeCache::new();
    let dir = cache.tmp.path().join("local-model");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.to_str().unwrap();
    assert_eq!(
        hub::resolve_model_dir(path, &cache.offline(), None).unwrap(),
        dir
    );

    cache.add_sharded_snapshot(&commit(1));
    cache.set_ref("main", &commit(1));
    assert_eq!(
        hub::resolve_model_dir(REPO, &cache.offline(), None).unwrap(),
        cache.snapshot_dir(&commit(1))
    );

    let missing = cache.tmp.path().join("no/such/dir");
    match hub::resolve_model_dir(missing.to_str().unwrap(), &cache.offline(), None) {
        Err(Error::InvalidRepoId { reason, .. }) => {
            assert!(reason.contains("local directory"), "{reason}")
        }
        other => panic!("expected InvalidRepoId, got {other:?}"),
    }
}

#[test]
fn options_keep_the_token_out_of_debug_output() {
    let opts = HubOptions::new()
        .with_token(Some("hf_secret_value".into()))
        .with_revision("v2");
    let debug = format!("{opts:?}");
    assert!(!debug.contains("hf_secret_value"), "{debug}");
    assert!(debug.contains("<redacted>") && opts.has_token());
    assert_eq!(opts.revision(), "v2");
    assert!(!opts.clone().with_token(None).has_token());
    assert_eq!(
        HubOptions::new().with_endpoint("http://mirror").endpoint(),
        "http://mirror"
    );
    assert_eq!(
        HubOptions::new()
            .with_timeout(Duration::from_secs(3))
            .timeout(),
        Duration::from_secs(3)
    );
}

// ---------------------------------------------------------------------------------------------
// A real model through the cache: the llama fixture, split into two shards.
// ---------------------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/llama/default-tied")
}

/// Splits a safetensors file into two by tensor name; returns the files' bytes and the
/// index's weight map.
fn split_safetensors(bytes: &[u8], names: [&str; 2]) -> (Vec<Vec<u8>>, BTreeMap<String, String>) {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let tensors: Vec<(&String, &serde_json::Value)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .collect();
    let half = tensors.len() / 2;
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (part, chunk) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let mut new_header = serde_json::Map::new();
        let mut body = Vec::new();
        for (name, info) in chunk {
            let offsets = info["data_offsets"].as_array().unwrap();
            let (start, end) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            let mut info = (*info).clone();
            info["data_offsets"] = serde_json::json!([body.len(), body.len() + end - start]);
            body.extend_from_slice(&data[start..end]);
            new_header.insert((*name).clone(), info);
            weight_map.insert((*name).clone(), names[part].to_owned());
        }
        let mut header_bytes = serde_json::to_vec(&new_header).unwrap();
        // Pad the header to 8 bytes with spaces, as safetensors writers do.
        let padding = (8 - header_bytes.len() % 8) % 8;
        header_bytes.extend(std::iter::repeat_n(b' ', padding));
        let mut file = (header_bytes.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header_bytes);
        file.extend_from_slice(&body);
        files.push(file);
    }
    (files, weight_map)
}

fn logits(dir: &Path) -> Vec<f32> {
    let model = mlx_models::load::load_model_dir(dir, None)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let tokens = Array::from_slice(&[1i32, 5, 9, 2], &[1, 4]);
    let mut cache = model.new_cache();
    let out = model
        .forward(&tokens, &mut cache, &mut Tap::off())
        .expect("forward");
    out.eval().expect("eval");
    out.as_slice::<f32>().to_vec()
}

#[test]
fn a_sharded_fixture_loads_from_the_resolved_snapshot() {
    let cache = FakeCache::new();
    let c = commit(42);
    let fixture = fixture_dir();
    for file in ["config.json", "generation_config.json"] {
        cache.add_file(&c, file, &std::fs::read(fixture.join(file)).unwrap());
    }
    cache.add_file(&c, "tokenizer.json", b"{}");
    let weights = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let (shards, weight_map) = split_safetensors(&weights, [SHARD_1, SHARD_2]);
    assert_eq!(
        weight_map
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        2
    );
    cache.add_file(&c, SHARD_1, &shards[0]);
    cache.add_file(&c, SHARD_2, &shards[1]);
    let index = serde_json::json!({ "metadata": { "total_size": weights.len() }, "weight_map": weight_map });
    cache.add_file(
        &c,
        "model.safetensors.index.json",
        index.to_string().as_bytes(),
    );
    cache.set_ref("main", &c);

    let dir = hub::snapshot(REPO, &cache.offline(), None).expect("snapshot");
    assert_eq!(dir, cache.snapshot_dir(&c));
    // The same logits as the unsharded fixture directory.
    assert_eq!(logits(&dir), logits(&fixture));
}

// ---------------------------------------------------------------------------------------------
// Downloads, from a fake Hub on 127.0.0.1.
// ---------------------------------------------------------------------------------------------

/// A Hub serving one repository over plain HTTP on the loopback interface, with the
/// headers hf-hub reads (`x-repo-commit`, `etag`, `content-range`).
#[derive(Default)]
struct FakeHubState {
    endpoint: String,
    sha: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Every request line served.
    requests: Vec<String>,
    /// Answer the file list with this status instead.
    status: Option<u16>,
    /// Send this file's headers, then stall without a body.
    stall: Option<String>,
}

struct FakeHub {
    endpoint: String,
    state: Arc<Mutex<FakeHubState>>,
}

impl FakeHub {
    fn start(sha: &str, files: &[(&str, &[u8])]) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(FakeHubState {
            endpoint: endpoint.clone(),
            sha: sha.to_owned(),
            files: files
                .iter()
                .map(|(n, c)| ((*n).to_owned(), c.to_vec()))
                .collect(),
            ..Default::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        FakeHub { endpoint, state }
    }

    fn full_downloads(&self, file: &str) -> usize {
        let suffix = format!("/{file} bytes=0-");
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.ends_with(&suffix))
            .count()
    }

    fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    fn options(&self, cache: &FakeCache) -> HubOptions {
        HubOptions::new()
            .with_cache_dir(cache.cache_dir())
            .with_offline(false)
            .with_token(None)
            .with_endpoint(self.endpoint.clone())
            .with_timeout(Duration::from_secs(5))
    }
}

fn content_hash(bytes: &[u8]) -> String {
    // FNV-1a, as a stand-in for the Hub's sha256 etags.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

fn serve(stream: TcpStream, state: &Mutex<FakeHubState>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().strip_prefix("bytes=").map(str::to_owned);
            }
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_owned();
    let mut st = state.lock().unwrap();
    st.requests.push(format!(
        "{path} bytes={}",
        range.clone().unwrap_or_default()
    ));
    let mut out = stream;
    let respond = |out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = out.write_all(head.as_bytes());
        let _ = out.write_all(body);
    };
    let sha = st.sha.clone();
    if let Some(rest) = path.strip_prefix(&format!("/api/models/{REPO}/revision/")) {
        if let Some(code) = st.status {
            return respond(
                &mut out,
                &format!("{code} Nope"),
                &[],
                b"{\"error\":\"nope\"}",
            );
        }
        assert!(rest == "main" || rest == sha, "unexpected revision {rest}");
        let siblings: Vec<_> = st
            .files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": REPO, "sha": sha, "siblings": siblings }).to_string();
        return respond(
            &mut out,
            "200 OK",
            &[("Content-Type".into(), "application/json".into())],
            body.as_bytes(),
        );
    }
    // Weights are LFS files: the Hub redirects them to a CDN (here /cdn/<etag>), giving
    // the commit and etag in the redirect's headers.
    let (file, content, on_cdn) = if let Some(etag) = path.strip_prefix("/cdn/") {
        match st.files.iter().find(|(_, c)| content_hash(c) == etag) {
            Some((f, c)) => (f.clone(), c.clone(), true),
            None => return respond(&mut out, "404 Not Found", &[], b""),
        }
    } else if let Some(rest) = path.strip_prefix(&format!("/{REPO}/resolve/")) {
        let (revision, file) = rest.split_once('/').unwrap_or((rest, ""));
        match st.files.get(file) {
            Some(c) if revision == sha || revision == "main" => (file.to_owned(), c.clone(), false),
            _ => return respond(&mut out, "404 Not Found", &[], b""),
        }
    } else {
        return respond(&mut out, "404 Not Found", &[], b"");
    };
    let file = file.as_str();
    if !on_cdn && file.ends_with(".safetensors") {
        let etag = content_hash(&content);
        let headers = [
            ("Location".to_owned(), format!("{}/cdn/{etag}", st.endpoint)),
            ("X-Linked-Etag".to_owned(), format!("\"{etag}\"")),
            ("X-Linked-Size".to_owned(), content.len().to_string()),
            ("X-Repo-Commit".to_owned(), sha.clone()),
        ];
        return respond(&mut out, "302 Found", &headers, b"");
    }
    let start: usize = range
        .as_deref()
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = match range
        .as_deref()
        .and_then(|r| r.split('-').nth(1))
        .filter(|e| !e.is_empty())
    {
        Some(e) => e.parse::<usize>().unwrap() + 1,
        None => content.len(),
    }
    .min(content.len());
    let mut headers = vec![
        ("ETag".to_owned(), format!("\"{}\"", content_hash(&content))),
        (
            "Content-Range".to_owned(),
            format!("bytes {start}-{}/{}", end.max(1) - 1, content.len()),
        ),
    ];
    if !on_cdn {
        headers.push(("X-Repo-Commit".to_owned(), sha.clone()));
    }
    let stall = st.stall.as_deref() == Some(file) && end - start > 1;
    drop(st);
    if stall {
        let head = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\r\n",
            end - start
        );
        let _ = out.write_all(head.as_bytes());
        std::thread::sleep(Duration::from_secs(30));
        return;
    }
    respond(
        &mut out,
        "206 Partial Content",
        &headers,
        &content[start..end],
    );
}

/// ureq sends loopback requests through a proxy from the environment unless NO_PROXY
/// exempts them; the fake-Hub tests cannot run then.
fn loopback_is_proxied() -> bool {
    let proxied = [
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()));
    let exempt = ["NO_PROXY", "no_proxy"].iter().any(|v| {
        std::env::var(v).is_ok_and(|v| {
            v.split(',')
                .any(|e| matches!(e.trim(), "*" | "127.0.0.1" | "127.0.0.0/8"))
        })
    });
    if proxied && !exempt {
        eprintln!(
            "skipped: a proxy is set in the environment and NO_PROXY does not exempt 127.0.0.1"
        );
    }
    proxied && !exempt
}

fn sharded_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("config.json", b"{\"model_type\": \"llama\"}".to_vec()),
        ("tokenizer.json", b"{\"tokenizer\": 1}".to_vec()),
        ("generation_config.json", b"{\"temperature\": 0.5}".to_vec()),
        ("README.md", b"not needed".to_vec()),
        (
            "model.safetensors.index.json",
            index_json(&[SHARD_1, SHARD_2]).into_bytes(),
        ),
        (SHARD_1, vec![1u8; 3 << 20]),
        (SHARD_2, b"second shard".to_vec()),
    ]
}

#[test]
fn downloads_what_the_cache_lacks_then_works_offline() {
    if loopback_is_proxied() {
        return;
    }
    let files = sharded_files();
    let borrowed: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    let sha = commit(0xab);
    let server = FakeHub::start(&sha, &borrowed);
    let cache = FakeCache::new();

    let events: Mutex<Vec<(String, u64, u64)>> = Mutex::new(Vec::new());
    let record = |p: &DownloadProgress<'_>| {
        events
            .lock()
            .unwrap()
            .push((p.file.to_owned(), p.downloaded, p.total))
    };
    let dir = hub::snapshot(REPO, &server.options(&cache), Some(&record)).expect("download");
    assert_eq!(dir, cache.snapshot_dir(&sha));
    for (name, content) in &files {
        if *name == "README.md" {
            assert!(!dir.join(name).exists(), "README.md is not a model file");
        } else {
            assert_eq!(&std::fs::read(dir.join(name)).unwrap(), content, "{name}");
        }
    }
    // refs/main names the commit; no ref named after the commit itself is left.
    let refs = cache.repo_dir().join("refs");
    assert_eq!(
        std::fs::read_to_string(refs.join("main")).unwrap().trim(),
        sha
    );
    assert!(!refs.join(&sha).exists());
    // Progress: each file ends with downloaded == total; the big shard in several steps.
    let events = events.into_inner().unwrap();
    for (name, content) in &files {
        if *name != "README.md" {
            let last = events
                .iter()
                .rfind(|e| e.0 == *name)
                .unwrap_or_else(|| panic!("no progress for {name}"));
            assert_eq!(
                (last.1, last.2),
                (content.len() as u64, content.len() as u64),
                "{name}"
            );
        }
    }
    assert!(
        events.iter().filter(|e| e.0 == SHARD_1).count() >= 2,
        "{events:?}"
    );
    // The shards came through the CDN redirect (metadata and body of each).
    let cdn = server
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.starts_with("/cdn/"))
        .count();
    assert!(cdn >= 4, "{cdn} CDN requests");

    // Cached now: no request at all, online or offline.
    let served = server.request_count();
    assert_eq!(
        hub::snapshot(REPO, &server.options(&cache), None).unwrap(),
        dir
    );
    assert_eq!(hub::snapshot(REPO, &cache.offline(), None).unwrap(), dir);
    assert_eq!(server.request_count(), served);

    // A new commit changing only the config: the unchanged shards come from the blobs.
    let sha2 = commit(0xcd);
    {
        let mut st = server.state.lock().unwrap();
        st.sha = sha2.clone();
        st.files.insert(
            "config.json".into(),
            b"{\"model_type\": \"llama\", \"v\": 2}".to_vec(),
        );
    }
    // main still points at the old, complete snapshot, so ask for the new commit.
    let dir2 = hub::snapshot(
        REPO,
        &server.options(&cache).with_revision(sha2.clone()),
        None,
    )
    .expect("update");
    assert_eq!(dir2, cache.snapshot_dir(&sha2));
    assert_eq!(
        std::fs::read(dir2.join("config.json")).unwrap(),
        b"{\"model_type\": \"llama\", \"v\": 2}"
    );
    assert_eq!(std::fs::read(dir2.join(SHARD_1)).unwrap(), files[5].1);
    assert_eq!(
        server.full_downloads(SHARD_1),
        1,
        "the unchanged shard was downloaded again"
    );
    assert_eq!(server.full_downloads("config.json"), 2);
    assert!(!refs.join(&sha2).exists());
}

#[test]
fn a_repository_without_a_required_file_is_a_typed_error() {
    if loopback_is_proxied() {
        return;
    }
    let server = FakeHub::start(
        &commit(1),
        &[("config.json", b"{}"), ("model.safetensors", b"w")],
    );
    let cache = FakeCache::new();
    match hub::snapshot(REPO, &server.options(&cache), None) {
        Err(Error::HubFileMissing {
            repo,
            revision,
            file,
            reason,
        }) => {
            assert_eq!(
                (repo.as_str(), revision.as_str(), file.as_str()),
                (REPO, "main", "tokenizer.json")
            );
            assert!(reason.contains("repository"), "{reason}");
        }
        other => panic!("expected HubFileMissing, got {other:?}"),
    }
    // Nothing but the file list was asked for.
    assert_eq!(server.request_count(), 1);

    // An index naming a shard the repository lacks.
    let index = index_json(&[SHARD_1, SHARD_2]);
    let server = FakeHub::start(
        &commit(2),
        &[
            ("config.json", b"{}"),
            ("tokenizer.json", b"{}"),
            ("model.safetensors.index.json", index.as_bytes()),
            (SHARD_1, b"s"),
        ],
    );
    match hub::snapshot(REPO, &server.options(&cache), None) {
        Err(Error::HubFileMissing { file, .. }) => assert_eq!(file, SHARD_2),
        other => panic!("expected HubFileMissing, got {other:?}"),
    }
    assert_eq!(
        server.full_downloads(SHARD_1),
        0,
        "shards are fetched only once all are known to exist"
    );
}

#[test]
fn refused_and_unreachable_hubs_fail_fast_with_a_clear_error() {
    if loopback_is_proxied() {
        return;
    }
    let cache = FakeCache::new();
    // 401: private, gated or missing.
    let server = FakeHub::start(&commit(1), &[]);
    server.state.lock().unwrap().status = Some(401);
    match hub::snapshot(REPO, &server.options(&cache), None) {
        Err(Error::Hub {
            repo,
            revision,
            message,
        }) => {
            assert_eq!((repo.as_str(), revision.as_str()), (REPO, "main"));
            assert!(
                message.contains("401") && message.contains("HF_TOKEN"),
                "{message}"
            );
        }
        other => panic!("expected Hub, got {other:?}"),
    }

    // Nothing listening: connection refused.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let opts = server.options(&cache).with_endpoint(closed_endpoint);
    match hub::snapshot(REPO, &opts, None) {
        Err(Error::Hub { message, .. }) => assert!(message.contains("HF_HUB_OFFLINE"), "{message}"),
        other => panic!("expected Hub, got {other:?}"),
    }

    // A peer that accepts but never answers: the timeout ends the wait.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let opts = server
        .options(&cache)
        .with_endpoint(format!("http://{}", silent.local_addr().unwrap()))
        .with_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let result = hub::snapshot(REPO, &opts, None);
    let elapsed = started.elapsed();
    match result {
        Err(Error::Hub { message, .. }) => assert!(message.contains("within 0.5s"), "{message}"),
        other => panic!("expected Hub, got {other:?}"),
    }
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    drop(silent);
}

#[test]
fn a_stalled_download_times_out() {
    if loopback_is_proxied() {
        return;
    }
    let files = sharded_files();
    let borrowed: Vec<(&str, &[u8])> = files.iter().map(|(n, c)| (*n, c.as_slice())).collect();
    let server = FakeHub::start(&commit(3), &borrowed);
    server.state.lock().unwrap().stall = Some(SHARD_2.to_owned());
    let cache = FakeCache::new();
    let opts = server
        .options(&cache)
        .with_timeout(Duration::from_millis(700));
    let started = Instant::now();
    let result = hub::snapshot(REPO, &opts, None);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    match result {
        Err(Error::Hub { message, .. }) => {
            assert!(
                message.contains(SHARD_2) && message.contains("nothing from"),
                "{message}"
            )
        }
        other => panic!("expected Hub, got {other:?}"),
    }
    // The files before it are in place; refs/main was not moved to the incomplete snapshot.
    assert!(cache.snapshot_dir(&commit(3)).join(SHARD_1).is_file());
    assert!(!cache.repo_dir().join("refs/main").exists());
    // Offline, the missing shard is named.
    match hub::snapshot(REPO, &cache.offline().with_revision(commit(3)), None) {
        Err(Error::HubFileMissing { file, .. }) => assert_eq!(file, SHARD_2),
        other => panic!("expected HubFileMissing, got {other:?}"),
    }
}
