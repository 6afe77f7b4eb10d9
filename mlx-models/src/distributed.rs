//! MLX's own distributed layer, for running one model across several processes or
//! machines: a [`Group`] of ranks and the collectives tensor parallelism needs
//! (`all_sum`, `all_gather`, `send`/`recv`).
//!
//! The processes find each other through MLX's environment, as Python's
//! `mx.distributed.init()` does. With the `ring` backend (TCP, the one the CPU wheel has)
//! that is `MLX_RANK` (this process's rank) and `MLX_HOSTFILE` (a JSON file listing, per
//! rank, the `"host:port"` addresses it listens on):
//!
//! ```json
//! [["192.168.1.10:5000"], ["192.168.1.11:5000"]]
//! ```
//!
//! Without that environment [`Group::init`] gives a group of one process, on which the
//! collectives return their input: code written for several ranks runs unchanged alone.
//! `mlx-models launch` sets the environment up for N local processes (or uses a hostfile).
//!
//! ```
//! use mlx_models::distributed::{Backend, Group};
//! use mlx_rs::Array;
//! // No MLX_RANK / MLX_HOSTFILE here: a single process.
//! let group = Group::init(Backend::Ring)?;
//! assert_eq!((group.rank(), group.size()), (0, 1));
//! let sum = group.all_sum(&Array::from_slice(&[1.0f32, 2.0], &[2]))?;
//! assert_eq!(sum.as_slice::<f32>(), &[1.0, 2.0]);
//! # Ok::<(), mlx_models::Error>(())
//! ```

use crate::error::{Error, Result};
use mlx_rs::{Array, Dtype, Stream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which of MLX's communication backends to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The first that starts, in MLX's order (NCCL on CUDA, ring, MPI, JACCL).
    Any,
    /// Rings of TCP connections between neighbouring ranks (`MLX_RANK`, `MLX_HOSTFILE`);
    /// the one backend of the CPU wheel. It has no `split` and no `sum_scatter`, and sends
    /// only to the ranks next to the sender.
    Ring,
    /// MPI (`mpirun`), where MLX was built with it.
    Mpi,
    /// NCCL, on CUDA builds.
    Nccl,
    /// JACCL (RDMA over Thunderbolt, macOS).
    Jaccl,
}

impl Backend {
    /// MLX's name for the backend.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Any => "any",
            Backend::Ring => "ring",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
            Backend::Jaccl => "jaccl",
        }
    }

    /// The backend MLX calls `name`.
    pub fn from_name(name: &str) -> Result<Backend> {
        Ok(match name {
            "any" => Backend::Any,
            "ring" => Backend::Ring,
            "mpi" => Backend::Mpi,
            "nccl" => Backend::Nccl,
            "jaccl" => Backend::Jaccl,
            other => {
                return Err(Error::Distributed {
                    message: format!("unknown backend `{other}` (any, ring, mpi, nccl, jaccl)"),
                })
            }
        })
    }

    /// Whether this MLX build has the backend.
    pub fn is_available(self) -> bool {
        ensure_error_handler();
        let name = std::ffi::CString::new(self.name()).expect("no NUL in backend names");
        unsafe { mlx_sys::mlx_distributed_is_available(name.as_ptr()) }
    }
}

/// The ranks' addresses as MLX's ring backend reads them from `MLX_HOSTFILE`: one list of
/// `host:port` addresses per rank, in rank order (several addresses per rank open several
/// connections between neighbours; every rank must list as many).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostfile {
    pub ranks: Vec<Vec<String>>,
}

impl Hostfile {
    /// Reads and checks a hostfile.
    pub fn read(path: &Path) -> Result<Hostfile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Hostfile::parse(path, &text)
    }

    /// Checks the JSON text of a hostfile (`path` names it in errors). MLX's own
    /// `mlx.launch` format (`[{"ssh": "host", "ips": ["10.0.0.1"]}, …]`) lists machines, not
    /// ports: it is refused with a hint.
    pub fn parse(path: &Path, text: &str) -> Result<Hostfile> {
        let bad = |message: String| Error::Hostfile {
            path: path.to_path_buf(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let list = value
            .as_array()
            .ok_or_else(|| bad("expected a JSON list with one entry per rank".into()))?;
        let mut ranks = Vec::with_capacity(list.len());
        for (rank, entry) in list.iter().enumerate() {
            let addresses: Vec<&serde_json::Value> = match entry {
                serde_json::Value::String(_) => vec![entry],
                serde_json::Value::Array(a) => a.iter().collect(),
                serde_json::Value::Object(o) if o.contains_key("ips") => {
                    return Err(bad(format!(
                        "rank {rank} is an mlx.launch machine entry (`ssh`/`ips`); give \
                         each rank its \"host:port\" addresses instead, e.g. \
                         [[\"10.0.0.1:5000\"], [\"10.0.0.2:5000\"]]"
                    )))
                }
                _ => {
                    return Err(bad(format!(
                        "rank {rank}: expected a list of \"host:port\" strings"
                    )))
                }
            };
            let mut parsed = Vec::with_capacity(addresses.len());
            for a in addresses {
                let a = a.as_str().ok_or_else(|| {
                    bad(format!("rank {rank}: {a} is not a \"host:port\" string"))
                })?;
                check_address(a).map_err(|m| bad(format!("rank {rank}: `{a}`: {m}")))?;
                parsed.push(a.to_owned());
            }
            if parsed.is_empty() {
                return Err(bad(format!("rank {rank} lists no address")));
            }
            ranks.push(parsed);
        }
        if ranks.len() < 2 {
            return Err(bad(format!(
                "{} rank(s): a ring needs at least 2 (run a single process without \
                 MLX_HOSTFILE)",
                ranks.len()
            )));
        }
        if let Some(r) = ranks.iter().position(|r| r.len() != ranks[0].len()) {
            return Err(bad(format!(
                "rank {r} lists {} addresses, rank 0 {}: every rank needs as many",
                ranks[r].len(),
                ranks[0].len()
            )));
        }
        Ok(Hostfile { ranks })
    }

    /// The JSON MLX reads.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.ranks).expect("strings serialize")
    }
}

fn check_address(address: &str) -> std::result::Result<(), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| "no `:port`".to_owned())?;
    if host.is_empty() {
        return Err("no host".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("port `{port}` is not a number from 1 to 65535")),
    }
}

struct RawGroup(mlx_sys::mlx_distributed_group);

// MLX's group is a shared pointer to its backend, which serializes its own traffic; the
// handle is only read after creation.
unsafe impl Send for RawGroup {}
unsafe impl Sync for RawGroup {}

impl Drop for RawGroup {
    fn drop(&mut self) {
        unsafe {
            mlx_sys::mlx_distributed_group_free(self.0);
        }
    }
}

/// A group of processes (ranks) that compute together.
#[derive(Clone)]
pub struct Group {
    raw: Arc<RawGroup>,
    rank: i32,
    size: i32,
    backend: Backend,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Group(rank {} of {}, {})",
            self.rank,
            self.size,
            self.backend.name()
        )
    }
}

/// mlx-rs installs the error handler that turns MLX's errors into return codes on its
/// first operation; the raw calls below need it in place (MLX's default one exits).
fn ensure_error_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = mlx_rs::memory::active_memory();
    });
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Group {
    /// Joins the group MLX's environment describes, with `backend`. For the ring backend
    /// `MLX_RANK` and `MLX_HOSTFILE` are checked first (a rank within the hostfile, a
    /// well-formed hostfile of at least two ranks), so a bad setup is a typed error rather
    /// than a hang; with neither set, the group is this process alone.
    pub fn init(backend: Backend) -> Result<Group> {
        ensure_error_handler();
        let ring_env = (env("MLX_RANK"), env("MLX_HOSTFILE"));
        let strict = match (backend, &ring_env) {
            (Backend::Ring | Backend::Any, (Some(rank), Some(hostfile))) => {
                let hosts = Hostfile::read(Path::new(hostfile))?;
                let rank: i32 = rank.parse().map_err(|_| Error::DistributedEnv {
                    variable: "MLX_RANK".into(),
                    message: format!("`{rank}` is not a rank (0, 1, …)"),
                })?;
                if rank < 0 || rank as usize >= hosts.ranks.len() {
                    return Err(Error::DistributedEnv {
                        variable: "MLX_RANK".into(),
                        message: format!(
                            "rank {rank} is not among the {} ranks of {hostfile}",
                            hosts.ranks.len()
                        ),
                    });
                }
                true
            }
            (Backend::Ring | Backend::Any, (Some(_), None)) => {
                return Err(Error::DistributedEnv {
                    variable: "MLX_HOSTFILE".into(),
                    message: "not set, but MLX_RANK is: set both, or neither for one process"
                        .into(),
                })
            }
            (Backend::Ring | Backend::Any, (None, Some(_))) => {
                return Err(Error::DistributedEnv {
                    variable: "MLX_RANK".into(),
                    message: "not set, but MLX_HOSTFILE is: set both, or neither for one process"
                        .into(),
                })
            }
            (Backend::Ring | Backend::Any, (None, None)) => false,
            (Backend::Mpi | Backend::Nccl | Backend::Jaccl, _) => {
                if !backend.is_available() {
                    return Err(Error::Distributed {
                        message: format!("this MLX build has no `{}` backend", backend.name()),
                    });
                }
                true
            }
        };
        let name = std::ffi::CString::new(backend.name()).expect("no NUL in backend names");
        let mut raw = unsafe { mlx_sys::mlx_distributed_group_new() };
        let status = unsafe { mlx_sys::mlx_distributed_init(&mut raw, strict, name.as_ptr()) };
        if status != 0 || raw.ctx.is_null() {
            if !raw.ctx.is_null() {
                unsafe { mlx_sys::mlx_distributed_group_free(raw) };
            }
            return Err(Error::Distributed {
                message: format!(
                    "MLX could not start the `{}` backend (MLX_RANK={}, MLX_HOSTFILE={}): a \
                     peer did not answer or an address could not be bound",
                    backend.name(),
                    ring_env.0.as_deref().unwrap_or(""),
                    ring_env.1.as_deref().unwrap_or("")
                ),
            });
        }
        let rank = unsafe { mlx_sys::mlx_distributed_group_rank(raw) };
        let size = unsafe { mlx_sys::mlx_distributed_group_size(raw) };
        Ok(Group {
            raw: Arc::new(RawGroup(raw)),
            rank,
            size,
            backend,
        })
    }

    /// This process's rank, `0..size`.
    pub fn rank(&self) -> i32 {
        self.rank
    }

    /// How many processes the group has.
    pub fn size(&self) -> i32 {
        self.size
    }

    /// The backend the group was started with.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The sub-group of the ranks that pass the same `color`, ordered by `key` (MPI's
    /// `comm_split`). The ring backend cannot split: an error says so.
    pub fn split(&self, color: i32, key: i32) -> Result<Group> {
        if self.size == 1 {
            return Ok(self.clone());
        }
        if self.backend == Backend::Ring {
            return Err(Error::Distributed {
                message: "the ring backend cannot split a group".into(),
            });
        }
        let mut raw = unsafe { mlx_sys::mlx_distributed_group_new() };
        let status =
            unsafe { mlx_sys::mlx_distributed_group_split(&mut raw, self.raw.0, color, key) };
        if status != 0 || raw.ctx.is_null() {
            return Err(Error::Distributed {
                message: format!(
                    "the `{}` backend could not split the group",
                    self.backend.name()
                ),
            });
        }
        let (rank, size) = unsafe {
            (
                mlx_sys::mlx_distributed_group_rank(raw),
                mlx_sys::mlx_distributed_group_size(raw),
            )
        };
        Ok(Group {
            raw: Arc::new(RawGroup(raw)),
            rank,
            size,
            backend: self.backend,
        })
    }

    /// The element-wise sum of `x` over all ranks, on every rank (lazy, like any MLX op).
    pub fn all_sum(&self, x: &Array) -> Result<Array> {
        self.op("all_sum", |res, s| unsafe {
            mlx_sys::mlx_distributed_all_sum(res, x.as_ptr(), self.raw.0, s)
        })
    }

    /// Every rank's `x` concatenated along the first axis, in rank order, on every rank.
    pub fn all_gather(&self, x: &Array) -> Result<Array> {
        self.op("all_gather", |res, s| unsafe {
            mlx_sys::mlx_distributed_all_gather(res, x.as_ptr(), self.raw.0, s)
        })
    }

    /// Sends `x` to rank `dst`; evaluate the result to send. The ring backend sends only
    /// to the ranks next to this one.
    pub fn send(&self, x: &Array, dst: i32) -> Result<Array> {
        self.check_peer("send to", dst)?;
        self.op("send", |res, s| unsafe {
            mlx_sys::mlx_distributed_send(res, x.as_ptr(), dst, self.raw.0, s)
        })
    }

    /// Receives an array of `shape` and `dtype` from rank `src`.
    pub fn recv(&self, shape: &[i32], dtype: Dtype, src: i32) -> Result<Array> {
        self.check_peer("receive from", src)?;
        self.op("recv", |res, s| unsafe {
            mlx_sys::mlx_distributed_recv(
                res,
                shape.as_ptr(),
                shape.len(),
                dtype.into(),
                src,
                self.raw.0,
                s,
            )
        })
    }

    fn check_peer(&self, what: &str, peer: i32) -> Result<()> {
        let neighbour = (peer - self.rank).rem_euclid(self.size.max(1));
        let ok = self.size > 1
            && (0..self.size).contains(&peer)
            && peer != self.rank
            && (self.backend != Backend::Ring || neighbour == 1 || neighbour == self.size - 1);
        if ok {
            return Ok(());
        }
        Err(Error::Distributed {
            message: format!(
                "rank {} cannot {what} rank {peer} in a group of {} ({})",
                self.rank,
                self.size,
                if self.backend == Backend::Ring {
                    "the ring backend reaches only its neighbours"
                } else {
                    "no such other rank"
                }
            ),
        })
    }

    fn op(
        &self,
        name: &str,
        f: impl FnOnce(&mut mlx_sys::mlx_array, mlx_sys::mlx_stream) -> i32,
    ) -> Result<Array> {
        let stream = Stream::thread_local_or_cpu();
        let mut res = unsafe { mlx_sys::mlx_array_new() };
        let status = f(&mut res, stream.as_ptr());
        if status != 0 {
            unsafe { mlx_sys::mlx_array_free(res) };
            return Err(Error::Distributed {
                message: format!("MLX refused {name} on rank {} of {}", self.rank, self.size),
            });
        }
        Ok(unsafe { Array::from_ptr(res) })
    }
}

/// The environment that makes a process rank `rank` of the ring in `hostfile`.
pub fn ring_env(rank: i32, hostfile: &Path) -> [(&'static str, String); 2] {
    [
        ("MLX_RANK", rank.to_string()),
        ("MLX_HOSTFILE", hostfile.display().to_string()),
    ]
}

/// Whether this process was started as one rank of several (MLX's ring environment set).
pub fn launched() -> bool {
    env("MLX_RANK").is_some() || env("MLX_HOSTFILE").is_some()
}

/// A hostfile for `n` ranks on this machine, each on a free TCP port of 127.0.0.1.
pub fn local_hostfile(n: usize) -> Result<Hostfile> {
    // Hold every listener until all ports are chosen, so no two ranks get the same one.
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(PathBuf::from("127.0.0.1"), e))?;
    let ranks = listeners
        .iter()
        .map(|l| Ok(vec![l.local_addr()?.to_string()]))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(PathBuf::from("127.0.0.1"), e))?;
    Ok(Hostfile { ranks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Hostfile> {
        Hostfile::parse(Path::new("hosts.json"), text)
    }

    #[test]
    fn hostfiles_in_mlx_ring_format_parse() {
        let h = parse(r#"[["10.0.0.1:5000"], ["10.0.0.2:5001"]]"#).unwrap();
        assert_eq!(h.ranks, vec![vec!["10.0.0.1:5000"], vec!["10.0.0.2:5001"]]);
        // A bare string per rank is read as a one-address list.
        let h = parse(r#"["a:1", "b:2", "c:3"]"#).unwrap();
        assert_eq!(h.ranks.len(), 3);
        assert_eq!(
            parse(&h.to_json()).unwrap(),
            h,
            "to_json gives MLX's list-of-lists form back"
        );
    }

    #[test]
    fn bad_hostfiles_are_typed_errors_naming_the_rank() {
        for (text, needle) in [
            ("{", "not valid JSON"),
            (r#"{"a": 1}"#, "JSON list"),
            (r#"[["10.0.0.1:5000"]]"#, "at least 2"),
            (
                r#"[["10.0.0.1:5000"], ["10.0.0.2"]]"#,
                "rank 1: `10.0.0.2`: no `:port`",
            ),
            (r#"[["h:5000"], ["h:99999"]]"#, "port `99999`"),
            (r#"[["h:1", "h:2"], ["h:3"]]"#, "rank 1 lists 1 addresses"),
            (
                r#"[{"ssh": "m1", "ips": ["10.0.0.1"]}, {"ssh": "m2", "ips": []}]"#,
                "mlx.launch",
            ),
            (r#"[[], ["h:1"]]"#, "rank 0 lists no address"),
            (r#"[[1], ["h:1"]]"#, "rank 0: 1 is not"),
        ] {
            match parse(text) {
                Err(e @ Error::Hostfile { .. }) => {
                    assert!(e.to_string().contains(needle), "{text}: {e}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn local_hostfiles_have_distinct_free_ports() {
        let h = local_hostfile(3).unwrap();
        let mut ports: Vec<&String> = h.ranks.iter().map(|r| &r[0]).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 3);
    }

    #[test]
    fn backends_by_name() {
        for b in [
            Backend::Any,
            Backend::Ring,
            Backend::Mpi,
            Backend::Nccl,
            Backend::Jaccl,
        ] {
            assert_eq!(Backend::from_name(b.name()).unwrap(), b);
        }
        assert!(matches!(
            Backend::from_name("tcp"),
            Err(Error::Distributed { .. })
        ));
        assert!(
            Backend::Ring.is_available(),
            "the CPU wheel has the ring backend"
        );
    }
}
