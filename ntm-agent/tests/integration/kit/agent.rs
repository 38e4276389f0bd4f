//! The agent process: every test and bench runs `ntm-agent` through
//! [`Agent`], which says what differs from one run to the next (flags,
//! environment, where its output goes) and nothing else.
//!
//! ```ignore
//! let _agent = Agent::in_ns(&link.a)
//!     .iface(&link.a_if)
//!     .port(9400)
//!     .args(["--drain-interval", "100ms"])
//!     .spawn();
//! ```

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use super::{Netns, scrape::Guard};

/// Where the agent's stdout and stderr go.
#[derive(Clone)]
enum Out {
    /// Nowhere (what a running agent's output does by default).
    Null,
    /// A file, created (or emptied) at spawn: stderr only.
    File(PathBuf),
    /// Pipes the test reads.
    Piped,
}

/// `ntm-agent` run inside a test namespace, built flag by flag. The flags
/// go on the command line in the order the calls add them (a filter
/// expression takes every word after its first, so that order matters).
///
/// Defaults: `--numeric` (see [`Agent::names`]), the history in the
/// namespace's own state folder, and, when spawned, stdout and stderr to
/// nowhere (see [`Agent::log_to`], [`Agent::piped`]).
#[must_use]
pub struct Agent<'a> {
    ns: &'a Netns,
    names: bool,
    /// The container runtime the Kubernetes rung asks; None: the rung is
    /// off, so that a runtime running on this machine never names a test's
    /// addresses.
    cri_socket: Option<PathBuf>,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    output: Option<Out>,
}

/// The address tests bind the endpoint to ([`Agent::port`]): every scrape
/// comes from inside the namespace.
pub const BIND: &str = "127.0.0.1";

impl<'a> Agent<'a> {
    /// The agent binary in `ns`.
    pub fn in_ns(ns: &'a Netns) -> Self {
        Self {
            ns,
            names: false,
            cri_socket: None,
            args: Vec::new(),
            envs: Vec::new(),
            output: None,
        }
    }

    /// Whether the agent names hosts. Off by default: with `--numeric` a
    /// test never lets it ask a DNS server of this machine about test
    /// addresses (tests of names turn it on and pass `--dns-server` with
    /// their own server). On also for a subcommand: `--numeric` is no flag
    /// of `detach`.
    pub fn names(mut self, on: bool) -> Self {
        self.names = on;
        self
    }

    /// `-i IFACE`.
    /// Names pods by asking the container runtime at `socket` (the
    /// Kubernetes rung; off otherwise).
    pub fn cri_socket(mut self, socket: &Path) -> Self {
        self.cri_socket = Some(socket.to_path_buf());
        self
    }

    pub fn iface(self, iface: &str) -> Self {
        self.args(["-i", iface])
    }

    /// `-b 127.0.0.1 -p PORT`: the endpoint on the namespace's loopback.
    pub fn port(self, port: u16) -> Self {
        self.args(["-b", BIND, "-p", &port.to_string()])
    }

    /// `-p PORT` alone: the endpoint on the agent's own default address
    /// (0.0.0.0 of the namespace), as the tests that never passed `-b` run it.
    pub fn port_any_address(self, port: u16) -> Self {
        self.args(["-p", &port.to_string()])
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable (`NTM_*` flags, `RUST_BACKTRACE`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Its stderr (the log) into `path` (stdout still to nowhere).
    pub fn log_to(mut self, path: &Path) -> Self {
        self.output = Some(Out::File(path.to_owned()));
        self
    }

    /// Its stdout and stderr into pipes, for the test to read.
    pub fn piped(mut self) -> Self {
        self.output = Some(Out::Piped);
        self
    }

    /// The command, with no stdio set.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns.name,
            env!("CARGO_BIN_EXE_ntm-agent"),
        ]);
        // Each namespace's agents keep their history apart from every
        // other test's (and from this machine's /var/lib/ntm); --state-dir
        // wins.
        cmd.env("NTM_STATE_DIR", self.ns.state_dir());
        if !self.names {
            cmd.arg("--numeric");
        }
        // In the environment, not as flags: a subcommand (`detach`) takes
        // none of the agent's flags.
        match &self.cri_socket {
            Some(socket) => cmd.env("NTM_CRI_SOCKETS", socket),
            None => cmd.env("NTM_NO_KUBERNETES", "1"),
        };
        cmd.args(&self.args);
        for (key, value) in &self.envs {
            cmd.env(key, value);
        }
        cmd
    }

    /// Starts it; it is killed when the guard drops.
    pub fn spawn(self) -> Guard {
        Guard(self.spawn_child())
    }

    /// Starts it, for a test that stops it itself (kill -9, SIGTERM, wait).
    pub fn spawn_child(self) -> Child {
        let mut cmd = self.command();
        let (stdout, stderr) = match self.output.unwrap_or(Out::Null) {
            Out::Null => (Stdio::null(), Stdio::null()),
            Out::File(path) => (
                Stdio::null(),
                File::create(&path)
                    .unwrap_or_else(|e| panic!("creating {path:?}: {e}"))
                    .into(),
            ),
            Out::Piped => (Stdio::piped(), Stdio::piped()),
        };
        cmd.stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting the agent: {e}"))
    }

    /// Runs it to the end (a subcommand, or a start that must fail) and
    /// returns what it printed.
    pub fn output(self) -> Output {
        self.command()
            .output()
            .unwrap_or_else(|e| panic!("running the agent: {e}"))
    }
}
