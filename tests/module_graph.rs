//! The house rule the README's Layout draws: inside each service crate, modules use each other
//! without cycles (shared errors and shared state are leaves), so each can be read and tested
//! from the bottom up. Read from the source text: `crate::name` and `super::name` paths of each
//! module file at a crate's top level (a directory module counts as one, its children inside
//! it), outside comments and the file's `#[cfg(test)]` tail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crate's top-level modules and, for each, the others it names.
fn module_graph(crate_dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(crate_dir).expect("crate dir") {
        let path = entry.expect("entry").path();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if path.is_dir() {
            let mut inside = Vec::new();
            collect_rs(&path, &mut inside);
            if path.join("mod.rs").exists() {
                files.insert(name, inside);
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && !["main", "lib", "build"].contains(&name.as_str())
            && !name.ends_with("_tests")
        {
            files.entry(name).or_default().push(path);
        }
    }
    let names: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(module, paths)| {
            let mut uses = BTreeSet::new();
            for path in paths {
                let text = std::fs::read_to_string(path).expect("module source");
                for used in named_modules(&code_of(&text), &names) {
                    if &used != module {
                        uses.insert(used);
                    }
                }
            }
            (module.clone(), uses)
        })
        .collect()
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("module dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_stem().is_some_and(|s| s != "tests")
        {
            out.push(path);
        }
    }
}

/// The file's code: before its `#[cfg(test)]` tail, with `//` comments removed.
fn code_of(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap_or_default();
    body.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// Top-level modules named as `crate::m` or `super::m`, or inside `use crate::{..}`.
fn named_modules(code: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
    };
    let mut found = BTreeSet::new();
    for prefix in ["crate::", "super::"] {
        for (at, _) in code.match_indices(prefix) {
            let rest = &code[at + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                found.extend(top_level_items(group).into_iter().map(|item| ident(item.trim())));
            } else {
                found.insert(ident(rest));
            }
        }
    }
    found.retain(|m| names.contains(m));
    found
}

/// The comma-separated items of a `{..}` group whose opening brace `group` follows, nested
/// groups kept whole.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0usize, 0, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

/// Every cycle's modules (strongly connected components of more than one module).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Two modules are in one cycle when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in graph.keys() {
        let mut comp: Vec<String> =
            reached[m].iter().filter(|o| reached[*o].contains(m)).cloned().collect();
        comp.sort();
        if comp.len() > 1 && !out.contains(&comp) {
            out.push(comp);
        }
    }
    out
}

fn assert_no_cycles(crate_dir: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(crate_dir);
    let graph = module_graph(&dir);
    assert!(graph.len() > 5, "{crate_dir}: only {} modules found", graph.len());
    let found = cycles(&graph);
    assert!(found.is_empty(), "{crate_dir}: modules that use each other in a cycle: {found:?}");
}

#[test]
fn the_pagers_modules_use_each_other_without_cycles() {
    assert_no_cycles("pager");
}

#[test]
fn the_supervisors_modules_use_each_other_without_cycles() {
    assert_no_cycles("supervisor");
}

#[test]
fn the_controllers_modules_use_each_other_without_cycles() {
    assert_no_cycles("controller");
}

#[test]
fn the_protocol_librarys_modules_use_each_other_without_cycles() {
    assert_no_cycles("src");
}

#[test]
fn a_cycle_is_found_and_a_chain_is_not() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert!(cycles(&graph(&[("a", "b"), ("b", "c")])).is_empty());
    assert_eq!(
        cycles(&graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")])),
        [vec!["a".to_string(), "b".into(), "c".into()]]
    );
    let names: BTreeSet<String> = ["session", "sweep", "metrics", "lost"].map(String::from).into();
    let code =
        code_of("use crate::{sweep::{Sweep, X}, metrics};\n// crate::lost\nuse super::session::X;");
    assert_eq!(
        named_modules(&code, &names),
        ["metrics", "session", "sweep"].map(String::from).into()
    );
}
