//! The Helm chart (helm/ntm): lint (strict), render with default and
//! non-default values, and validate every manifest against the Kubernetes
//! API schemas. The checks are in helm/tests/check_chart.py; they run in the
//! Python environment `cargo xtask test` prepares (NTM_PYTHON).

use std::process::Command;

pub fn chart_lints_renders_and_validates() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let python =
        std::env::var("NTM_PYTHON").unwrap_or_else(|_| format!("{root}/target/pyenv/bin/python"));
    if !std::path::Path::new(&python).exists() {
        assert!(
            std::env::var("NTM_REQUIRE_BPF").is_err(),
            "no Python environment for the chart test at {python}: run `cargo xtask test`"
        );
        eprintln!("SKIPPED: no Python environment at {python} (cargo xtask test prepares it)");
        return;
    }
    let out = Command::new(&python)
        .arg(format!("{root}/helm/tests/check_chart.py"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.trim_end().ends_with(" 0 failed"), "{report}");
}
