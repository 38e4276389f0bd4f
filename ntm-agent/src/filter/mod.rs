//! tcpdump filter expressions, with tcpdump's exact meaning, run in the
//! kernel before counting.
//!
//! - [`pcap`]: libpcap compiles the expression to classic BPF for each link
//!   type (Ethernet, raw IP), so the syntax and meaning are libpcap's;
//! - [`translate`]: classic BPF becomes one eBPF program per hook, which
//!   sees frames as tcpdump would (VLAN tags back in place);
//!
//! The datapath (`kernel::load`) loads the translated programs and swaps
//! them into the hooks' filter slots, each change atomic for frames in
//! flight.

pub mod pcap;
pub mod translate;

use std::{collections::BTreeMap, path::Path};

use ntm_common::programs::{self, HookPoint, LinkType};

use crate::sys::SyscallError;
pub use pcap::ClassicInsn;
pub use translate::{MAX_CLASSIC_INSNS, TranslateError};

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("bad filter expression {expression:?}: {message} (libpcap)")]
    Syntax { expression: String, message: String },
    #[error(
        "filter {expression:?} does not apply to {link} interfaces: {message} (libpcap); leave such interfaces out of -i, or change the filter"
    )]
    NotForLink {
        expression: String,
        link: &'static str,
        message: String,
    },
    #[error("filter {expression:?} cannot run in the kernel: {source}")]
    Translate {
        expression: String,
        #[source]
        source: TranslateError,
    },
    #[error(
        "not allowed to load the filter program: run ntm as root, or grant it CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
    )]
    NotPermitted,
    #[error(
        "the kernel refused filter {expression:?} for {hook} ({source}); it may be too complex for this kernel's verifier: simplify it. Verifier log tail:\n{log_tail}"
    )]
    Rejected {
        expression: String,
        hook: String,
        #[source]
        source: SyscallError,
        log_tail: String,
    },
    #[error("putting the filter in place failed: {0}")]
    Install(#[source] SyscallError),
    #[error("turning the filter on or off in the kernel programs failed: {0}")]
    Switch(#[source] aya::maps::MapError),
    #[error("reading the filter file {path}: {source}; fix the path given with -F/--filter-file")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A filter expression compiled by libpcap for each link type.
#[derive(Clone, Debug)]
pub struct Filter {
    pub expression: String,
    /// The classic program per link type, or libpcap's reason it has none
    /// there (`ether host ...` means nothing on a raw-IP link).
    programs: BTreeMap<LinkType, Result<Vec<ClassicInsn>, String>>,
}

impl Filter {
    /// Compiles `expression` for every link type. An expression libpcap
    /// refuses for all of them is a syntax error, with libpcap's message; one
    /// that also fits the kernel side's limits is checked here too, so a bad
    /// filter fails before anything is attached.
    pub fn compile(expression: &str) -> Result<Self, FilterError> {
        let mut programs = BTreeMap::new();
        for link in LinkType::ALL {
            programs.insert(link, pcap::compile(expression, link));
        }
        if let Some(Err(message)) = programs.get(&LinkType::Ethernet)
            && programs.values().all(|p| p.is_err())
        {
            return Err(FilterError::Syntax {
                expression: expression.to_string(),
                message: message.clone(),
            });
        }
        let filter = Self {
            expression: expression.to_string(),
            programs,
        };
        // Translation limits (length, loops) hold for any map fds.
        let fds = translate::MapFds {
            tails: 0,
            verdict: 0,
        };
        for (link, program) in &filter.programs {
            if let Ok(program) = program
                && let Some(hook) = programs::hook(HookPoint::TcIngress, *link)
            {
                translate::translate(program, hook, fds).map_err(|source| {
                    FilterError::Translate {
                        expression: expression.to_string(),
                        source,
                    }
                })?;
            }
        }
        Ok(filter)
    }

    /// The classic program for `link`, or why there is none.
    pub fn program(&self, link: LinkType) -> Result<&[ClassicInsn], FilterError> {
        match self.programs.get(&link) {
            Some(Ok(program)) => Ok(program),
            Some(Err(message)) => Err(FilterError::NotForLink {
                expression: self.expression.clone(),
                link: link.name(),
                message: message.clone(),
            }),
            None => Err(FilterError::NotForLink {
                expression: self.expression.clone(),
                link: link.name(),
                message: "not compiled".to_string(),
            }),
        }
    }
}

/// Reads a filter file as tcpdump's -F does: the whole file is the
/// expression, `#` starts a comment that runs to the end of the line.
pub fn read_filter_file(path: &Path) -> Result<String, FilterError> {
    let text = std::fs::read_to_string(path).map_err(|source| FilterError::File {
        path: path.display().to_string(),
        source,
    })?;
    Ok(expression_from_file_text(&text))
}

fn expression_from_file_text(text: &str) -> String {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_files_drop_comments_and_join_lines() {
        let text =
            "# count the LAN only\nsrc net 198.18.1.0/24 # inside\n  or dst net 198.18.1.0/24\n";
        assert_eq!(
            expression_from_file_text(text),
            "src net 198.18.1.0/24 or dst net 198.18.1.0/24"
        );
        assert_eq!(expression_from_file_text("# nothing\n\n"), "");
    }

    #[test]
    fn a_bad_expression_is_refused_with_libpcaps_message() {
        let err = Filter::compile("tcp prot 80").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"tcp prot 80\""), "{text}");
        assert!(text.contains("syntax error"), "{text}");
    }

    #[test]
    fn a_link_specific_expression_compiles_where_it_means_something() {
        let filter = Filter::compile("ether host 02:00:00:00:00:01").unwrap();
        assert!(filter.program(LinkType::Ethernet).is_ok());
        let err = filter.program(LinkType::RawIp).unwrap_err().to_string();
        assert!(err.contains("raw IP"), "{err}");
    }

    #[test]
    fn protochain_loops_are_accepted() {
        let filter = Filter::compile("ip6 protochain 6").unwrap();
        assert!(filter.program(LinkType::Ethernet).is_ok());
    }
}
