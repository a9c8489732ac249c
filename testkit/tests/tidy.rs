//! Repository hygiene: every source file of every crate starts with a `//!` doc explaining what
//! it does, and no `todo!()`/`unimplemented!()` hides in production code.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn workspace_sources() -> Vec<PathBuf> {
    let crate_dir = optiprism_testkit::crate_dir();
    let root = crate_dir.parent().unwrap();
    let mut files = Vec::new();
    for krate in [
        "types",
        "consensus",
        "dataflow",
        "flight",
        "node",
        "operator",
        "testkit",
        "chaos-tests",
    ] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 20, "found too few sources: {files:?}");
    files
}

#[test]
fn every_module_starts_with_a_doc_comment() {
    let missing: Vec<_> = workspace_sources()
        .into_iter()
        .filter(|f| {
            !std::fs::read_to_string(f)
                .unwrap()
                .trim_start()
                .starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a `//!` doc: {missing:?}"
    );
}

#[test]
fn no_placeholders_in_production_code() {
    let offenders: Vec<_> = workspace_sources()
        .into_iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            text.contains(concat!("todo", "!(")) || text.contains(concat!("unimplemented", "!("))
        })
        .collect();
    assert!(offenders.is_empty(), "placeholders in {offenders:?}");
}
