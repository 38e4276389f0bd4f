//! docs/configuration.md against the flag parser: every flag and `NTM_*`
//! variable `ntm-agent` takes (its subcommands' too) has a row in the
//! page's flag tables, with its variable on the same row, and every flag
//! and variable a row names is one `ntm-agent` takes.
//!
//! A row of a flag table is a Markdown table line whose first cell names a
//! flag (`--name`) or whose second cell names a variable (`NTM_NAME`); only
//! those two cells are read, so the other cells may mention anything.

use std::collections::BTreeSet;

use clap::CommandFactory;
use ntm_agent::config::Config;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");

/// One flag of the parser: its long names (with visible aliases), short
/// names and environment variable.
#[derive(Debug)]
struct Flag {
    id: String,
    longs: Vec<String>,
    shorts: Vec<String>,
    env: Option<String>,
}

/// One row of a flag table: the flags of its first cell and the variables
/// of its second.
#[derive(Debug)]
struct Row {
    line: usize,
    longs: BTreeSet<String>,
    shorts: BTreeSet<String>,
    envs: BTreeSet<String>,
}

/// Every argument of `command` and of its subcommands, but `--help` and
/// `--version` (clap's own).
fn flags(command: &clap::Command, out: &mut Vec<Flag>) {
    for arg in command.get_arguments() {
        if matches!(
            arg.get_action(),
            clap::ArgAction::Help
                | clap::ArgAction::HelpShort
                | clap::ArgAction::HelpLong
                | clap::ArgAction::Version
        ) {
            continue;
        }
        let mut longs = Vec::new();
        if let Some(long) = arg.get_long() {
            longs.push(format!("--{long}"));
        }
        for alias in arg.get_visible_aliases().into_iter().flatten() {
            longs.push(format!("--{alias}"));
        }
        let mut shorts = Vec::new();
        if let Some(short) = arg.get_short() {
            shorts.push(format!("-{short}"));
        }
        for alias in arg.get_visible_short_aliases().into_iter().flatten() {
            shorts.push(format!("-{alias}"));
        }
        out.push(Flag {
            id: format!("{} {}", command.get_name(), arg.get_id()),
            longs,
            shorts,
            env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
        });
    }
    for sub in command.get_subcommands() {
        flags(sub, out);
    }
}

/// The words of a table cell that look like flags or variables.
fn words(cell: &str) -> impl Iterator<Item = &str> {
    cell.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .filter(|w| !w.is_empty())
}

fn is_long(word: &str) -> bool {
    word.len() > 2
        && word.starts_with("--")
        && word.as_bytes()[2].is_ascii_alphabetic()
        && word[2..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn is_short(word: &str) -> bool {
    word.len() == 2 && word.starts_with('-') && word.as_bytes()[1].is_ascii_alphabetic()
}

fn is_env(word: &str) -> bool {
    word.len() > 4
        && word.starts_with("NTM_")
        && word
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// The rows of the page's flag tables.
fn rows(doc: &str) -> Vec<Row> {
    let mut out = Vec::new();
    for (index, line) in doc.lines().enumerate() {
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        // `\|` inside a cell is a literal bar (`--mode tc\|xdp`).
        let line = line.replace("\\|", "/");
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        let first = cells.first().copied().unwrap_or("");
        let second = cells.get(1).copied().unwrap_or("");
        let row = Row {
            line: index + 1,
            longs: words(first)
                .filter(|w| is_long(w))
                .map(str::to_string)
                .collect(),
            shorts: words(first)
                .filter(|w| is_short(w))
                .map(str::to_string)
                .collect(),
            envs: words(second)
                .filter(|w| is_env(w))
                .map(str::to_string)
                .collect(),
        };
        if !row.longs.is_empty() || !row.envs.is_empty() {
            out.push(row);
        }
    }
    out
}

pub fn every_flag_is_documented_and_every_documented_flag_exists() {
    let doc = std::fs::read_to_string(DOC).unwrap_or_else(|e| panic!("{DOC}: {e}"));
    let command = Config::command();
    let mut all = Vec::new();
    flags(&command, &mut all);
    assert!(
        all.len() > 40,
        "the parser has every flag ({} found)",
        all.len()
    );
    let rows = rows(&doc);
    let mut problems = Vec::new();

    // Every flag of the parser has a row, with its variable on it.
    for flag in &all {
        let row = rows.iter().find(|row| {
            if flag.longs.is_empty() {
                // A positional argument: its row is its variable's.
                flag.env.as_ref().is_some_and(|e| row.envs.contains(e))
            } else {
                flag.longs.iter().any(|l| row.longs.contains(l))
            }
        });
        let Some(row) = row else {
            problems.push(format!(
                "{} ({}) has no row in docs/configuration.md's flag tables",
                flag.id,
                flag.longs
                    .first()
                    .or(flag.env.as_ref())
                    .map_or("?", String::as_str)
            ));
            continue;
        };
        for name in flag.longs.iter().chain(&flag.shorts) {
            if !row.longs.contains(name) && !row.shorts.contains(name) {
                problems.push(format!(
                    "{}: line {} does not name {name}",
                    flag.id, row.line
                ));
            }
        }
        if let Some(env) = &flag.env
            && !row.envs.contains(env)
        {
            problems.push(format!(
                "{}: line {} does not give its variable {env}",
                flag.id, row.line
            ));
        }
    }

    // Every flag and variable a row names is the parser's.
    let longs: BTreeSet<&String> = all.iter().flat_map(|f| &f.longs).collect();
    let shorts: BTreeSet<&String> = all.iter().flat_map(|f| &f.shorts).collect();
    let envs: BTreeSet<&String> = all.iter().filter_map(|f| f.env.as_ref()).collect();
    for row in &rows {
        for long in &row.longs {
            if !longs.contains(long) && long != "--help" && long != "--version" {
                problems.push(format!("line {}: ntm-agent has no flag {long}", row.line));
            }
        }
        for short in &row.shorts {
            if !shorts.contains(short) && short != "-h" && short != "-V" {
                problems.push(format!("line {}: ntm-agent has no flag {short}", row.line));
            }
        }
        for env in &row.envs {
            if !envs.contains(env) {
                problems.push(format!(
                    "line {}: ntm-agent reads no variable {env}",
                    row.line
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md and the flags disagree:\n  {}",
        problems.join("\n  ")
    );
}
