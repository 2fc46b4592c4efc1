//! Imports point one way. Each top-level module of a crate may use only the modules of the
//! layers below its own, and the submodules of one folder form no circle among themselves (a
//! submodule may use its parent's items). A module added to a crate must be given a layer here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// logtap's layers, bottom first.
const LOGTAP: &[&str] = &[
    "values",
    "counters",
    "api",
    "record",
    "state",
    "framer",
    "ring",
    "host",
    "keeper",
    "discovery",
    "sources",
    "encryption",
    "sinks",
    "config",
    "report",
    "control",
    "daemon",
];
const FUSEFS: &[&str] =
    &["sync", "name", "backing", "journal", "kept", "capture", "tap", "reader", "model", "connection", "fuse"];

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The module path of a file below `src`: `sources/pipes/reader.rs` -> [sources, pipes, reader].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The lower-case segments a path starts with: `a::b::C` -> [a, b]; `a::f(x)` -> [a, f].
fn segments(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    for seg in path.split("::") {
        let name: String =
            seg.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        if name.is_empty() {
            break;
        }
        let whole = name.len() == seg.len();
        out.push(name);
        if !whole {
            break;
        }
    }
    out
}

/// Every `crate::a::b` and `super::b` path named in code (comments left out) of the file of
/// `module`, as module segments from the crate root.
fn uses(file: &Path, module: &[String]) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(file).expect("read source");
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (at, _) in line.match_indices("crate::") {
            out.push(segments(&line[at + "crate::".len()..]));
        }
        for (at, _) in line.match_indices("super::") {
            // `super::super::` and `crate::x::super` are not written here.
            if line[..at].ends_with("::") {
                continue;
            }
            let parent = &module[..module.len().saturating_sub(1)];
            out.push(parent.iter().cloned().chain(segments(&line[at + "super::".len()..])).collect());
        }
    }
    out
}

/// Checks one crate; returns what is wrong.
fn check(src: &Path, layers: &[&str], exempt: &[&str]) -> Vec<String> {
    let rank: BTreeMap<&str, usize> = layers.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut wrong = Vec::new();
    // Edges between sibling submodules, per folder, for the circle check.
    let mut siblings: BTreeMap<Vec<String>, BTreeSet<(String, String)>> = BTreeMap::new();
    for file in sources(src) {
        let module = module_of(src, &file);
        let Some(top) = module.first() else { continue };
        if exempt.contains(&top.as_str()) {
            continue;
        }
        let Some(&mine) = rank.get(top.as_str()) else {
            wrong.push(format!("{}: module {top} has no layer in tests/layers.rs", file.display()));
            continue;
        };
        for used in uses(&file, &module) {
            let Some(target) = used.first() else { continue };
            if target == top {
                // Within one module: siblings of a folder must not use each other in a circle.
                let common = module.iter().zip(&used).take_while(|(a, b)| a == b).count();
                if common < module.len() && common < used.len() {
                    let folder = module[..common].to_vec();
                    siblings.entry(folder).or_default().insert((module[common].clone(), used[common].clone()));
                }
                continue;
            }
            match rank.get(target.as_str()) {
                Some(&theirs) if theirs < mine => {}
                Some(_) => {
                    wrong.push(format!("{}: {top} uses crate::{target}, a layer above or beside it", file.display()))
                }
                None => {}
            }
        }
    }
    for (folder, edges) in &siblings {
        for (a, b) in edges {
            if reaches(edges, b, a) {
                wrong.push(format!("{}: {a} and {b} use each other (a circle)", folder.join("::")));
            }
        }
    }
    wrong
}

fn reaches(edges: &BTreeSet<(String, String)>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(at) = todo.pop() {
        if at == to {
            return true;
        }
        if seen.insert(at.clone()) {
            todo.extend(edges.iter().filter(|(a, _)| *a == at).map(|(_, b)| b.clone()));
        }
    }
    false
}

#[test]
fn imports_point_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // lib.rs declares the modules and main.rs (the CLI) is the top: both may use any.
    let mut wrong = check(&root.join("src"), LOGTAP, &["lib", "main"]);
    wrong.extend(check(&root.join("../fusefs/src"), FUSEFS, &["lib"]));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_an_upward_import() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("low")).expect("mkdir");
    std::fs::write(dir.path().join("low/mod.rs"), "use crate::high::Thing;\n// crate::high in a comment\n").unwrap();
    std::fs::write(dir.path().join("low/a.rs"), "fn f() { crate::low::b::g() }\n").unwrap();
    std::fs::write(dir.path().join("low/b.rs"), "fn g() { crate::low::a::f() }\n").unwrap();
    std::fs::write(dir.path().join("high.rs"), "use crate::low::Thing;\n").unwrap();
    let wrong = check(dir.path(), &["low", "high"], &[]);
    assert_eq!(wrong.len(), 3, "{wrong:?}");
    assert!(wrong.iter().any(|w| w.contains("low uses crate::high")), "{wrong:?}");
    assert!(wrong.iter().any(|w| w.contains("a and b use each other")), "{wrong:?}");
}
