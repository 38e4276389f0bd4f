//! `main.rs` lists every test by hand (with what it needs): this check
//! fails when a test exists but is not in that list (`TESTS`, or `CASES`
//! for a test run over a table of cases), or when a module is not declared
//! and so not even compiled.

use std::{collections::BTreeSet, fs, path::Path};

/// Every module file here (but `main.rs` and the `kit/`) is declared in
/// `main.rs`, every `pub fn NAME() {` at the top of it, a test, is in
/// `TESTS`, and every `pub fn NAME(case: &str) {`, a test run over cases,
/// is in `CASES` with at least one case. Modules keep their helpers
/// private or in the kit, so a public function of a module is a test.
pub fn every_integration_test_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration");
    let main = fs::read_to_string(dir.join("main.rs")).expect("reading main.rs");
    let listed: BTreeSet<&str> = crate::TESTS.iter().map(|&(_, name, _)| name).collect();
    let with_cases: BTreeSet<&str> = crate::CASES
        .iter()
        .filter(|&&(_, _, cases, _)| !cases.is_empty())
        .map(|&(_, name, _, _)| name)
        .collect();
    let mut unlisted = Vec::new();
    let mut modules = 0;
    for entry in fs::read_dir(&dir).expect("listing tests/integration") {
        let path = entry.expect("listing tests/integration").path();
        let Some(module) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rs"))
        else {
            continue;
        };
        if module == "main" {
            continue;
        }
        modules += 1;
        if !main.lines().any(|l| l.trim() == format!("mod {module};")) {
            unlisted.push(format!("{module}.rs has no `mod {module};` in main.rs"));
        }
        let text = fs::read_to_string(&path).expect("reading a test module");
        for (name, params) in text.lines().filter_map(|l| {
            let signature = l.strip_prefix("pub fn ")?;
            signature
                .strip_suffix(") {")
                .or_else(|| signature.strip_suffix(") {}"))?
                .split_once('(')
        }) {
            let test = format!("{module}::{name}");
            if params.is_empty() && !listed.contains(test.as_str()) {
                unlisted.push(format!("{test} is not in TESTS"));
            } else if !params.is_empty() && !with_cases.contains(test.as_str()) {
                unlisted.push(format!("{test} is not in CASES"));
            }
        }
    }
    assert!(modules > 10, "found only {modules} test modules in {dir:?}");
    assert!(
        unlisted.is_empty(),
        "add these to main.rs (TESTS says what each test needs):\n{}",
        unlisted.join("\n")
    );
}
