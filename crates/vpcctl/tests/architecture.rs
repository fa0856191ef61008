//! The architecture's rules, checked: the dependency table in docs/architecture.md against what
//! `cargo tree` resolves for each crate, and `#![forbid(unsafe_code)]` in every crate that has no
//! unsafe code.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The rows of the "Dependency rules" table: (package and `cargo tree` flags, what it must not link).
fn rules() -> Vec<(String, Vec<String>)> {
    let doc = std::fs::read_to_string(workspace().join("docs/architecture.md")).unwrap();
    let section = doc
        .split("### Dependency rules")
        .nth(1)
        .expect("docs/architecture.md has a Dependency rules section");
    let ticked = |cell: &str| -> Vec<String> {
        cell.split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    section
        .lines()
        .skip_while(|l| !l.starts_with("| package"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.trim_matches('|').split('|').collect();
            assert_eq!(cells.len(), 2, "row {row:?}");
            let build = cells[0]
                .split('`')
                .nth(1)
                .expect("the package in backticks");
            (build.to_string(), ticked(cells[1]))
        })
        .collect()
}

/// Every package and every enabled feature a build of `build` (a package, and flags such as
/// `--no-default-features`) alone links, as `name` and `name/feature`.
fn linked(build: &str) -> Vec<String> {
    let mut words = build.split_whitespace();
    let package = words.next().expect("a package");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal,features",
            "--prefix",
            "none",
        ])
        .args(words)
        .current_dir(workspace())
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {build}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            match (words.next(), words.next()) {
                (Some("feature"), Some(feature)) => {
                    Some(format!("{name}/{}", feature.trim_matches('"')))
                }
                _ => Some(name.to_string()),
            }
        })
        .collect()
}

#[test]
fn no_crate_links_what_the_architecture_forbids() {
    let rules = rules();
    assert!(rules.len() >= 10, "the table lost rows: {rules:?}");
    let mut broken = Vec::new();
    for (build, forbidden) in &rules {
        let linked = linked(build);
        let package = build.split_whitespace().next().unwrap();
        assert!(
            linked.iter().any(|l| l == package),
            "cargo tree -p {package} does not list the package itself: is the table's name right?"
        );
        for f in forbidden {
            if linked.contains(f) {
                broken.push(format!("{build} links {f}"));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn the_check_sees_what_a_crate_links() {
    // The daemon links everything the others must not: if this finds nothing, the check is blind.
    let daemon = linked("ipamd");
    for expected in ["aws-sdk-ec2", "kube", "tokio/rt-multi-thread", "ipam"] {
        assert!(daemon.iter().any(|l| l == expected), "{expected} not seen");
    }
}

#[test]
fn crates_without_unsafe_code_forbid_it() {
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(workspace().join("crates")).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        let mut files = Vec::new();
        collect_rs(&src, &mut files);
        if files
            .iter()
            .any(|f| has_unsafe_code(&std::fs::read_to_string(f).unwrap()))
        {
            continue;
        }
        for root in ["lib.rs", "main.rs"] {
            let root = src.join(root);
            if root.exists()
                && !std::fs::read_to_string(&root)
                    .unwrap()
                    .contains("#![forbid(unsafe_code)]")
            {
                missing.push(root.display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "no unsafe code, yet not forbidden: {missing:#?}"
    );
}

/// Whether the source has an unsafe block, function, impl or trait (not the word in prose).
fn has_unsafe_code(source: &str) -> bool {
    source.lines().any(|line| {
        let code = line.split("//").next().unwrap_or_default();
        code.match_indices("unsafe").any(|(i, _)| {
            let after = code[i + "unsafe".len()..].trim_start();
            let before_ok = i == 0
                || !code.as_bytes()[i - 1].is_ascii_alphanumeric()
                    && code.as_bytes()[i - 1] != b'_';
            before_ok
                && ["{", "fn", "impl", "trait", "extern"]
                    .iter()
                    .any(|k| after.starts_with(k))
        })
    })
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_unsafe_finder_tells_code_from_prose() {
    assert!(has_unsafe_code("    let rc = unsafe { libc::getuid() };"));
    assert!(has_unsafe_code("pub unsafe fn f() {}"));
    assert!(!has_unsafe_code("// this would be unsafe { }"));
    assert!(!has_unsafe_code("#![forbid(unsafe_code)]"));
    assert!(!has_unsafe_code("let not_unsafe = 1;"));
}
