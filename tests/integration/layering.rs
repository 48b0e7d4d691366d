//! The crate's modules depend one way: no import cycle among the top-level modules of `src/`,
//! and none among the files of one folder (siblings). A folder's `mod.rs` is its facade: it may
//! compose its children and they may use what it defines, so those edges are not counted.
//!
//! The graph is read from the source text: every `crate::…` and `super::…` path, including the
//! groups of `use` trees, with comments, strings and `#[cfg(test)] mod tests` left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path: `["broker", "tokens"]` for `src/broker/tokens.rs`.
type ModPath = Vec<String>;

#[test]
fn no_import_cycle_between_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = module_files(&src);
    let known: BTreeSet<ModPath> = files.keys().cloned().collect();
    let mut edges: BTreeSet<(ModPath, ModPath)> = BTreeSet::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path).unwrap();
        for target in referenced_paths(&code_only(&text), module) {
            if let Some(to) = resolve(&known, &target) {
                edges.insert((module.clone(), to));
            }
        }
    }
    let mut cycles = Vec::new();
    cycles.extend(find_cycle(&collapse(&edges, &[])).map(|c| format!("top level: {c}")));
    let folders: BTreeSet<ModPath> = known
        .iter()
        .filter(|m| m.len() > 1)
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    for folder in &folders {
        let c = find_cycle(&collapse(&edges, folder));
        cycles.extend(c.map(|c| format!("in {}/: {c}", folder.join("/"))));
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
    assert!(
        edges.len() > 50,
        "the graph was not read: {} edges",
        edges.len()
    );
}

/// The domain (the broker, its store, model, crypto, audit and leaf helpers) speaks domain
/// types only: gRPC, HTTP-server and HTTP-client types are mapped at the edge (`server/`,
/// `backends/`, `error`'s one mapping to status codes).
#[test]
fn the_domain_names_no_transport_types() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let domain = [
        "broker", "store", "model", "crypto", "audit", "util", "secret",
    ];
    let transport = [
        "tonic::",
        "axum::",
        "hyper::",
        "hyper_util::",
        "http::",
        "tower::",
    ];
    let mut found = Vec::new();
    for (module, path) in module_files(&src) {
        if !domain.contains(&module[0].as_str()) {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(&path).unwrap());
        for t in transport {
            let named = code.match_indices(t).any(|(i, _)| {
                let before = code[..i].chars().next_back();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            });
            if named {
                found.push(format!("{}: {t}", module.join("::")));
            }
        }
    }
    assert!(
        found.is_empty(),
        "transport types in the domain: {found:#?}"
    );
}

/// The checker itself finds a cycle, both at the top level and among siblings.
#[test]
fn the_layering_check_sees_a_cycle() {
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<ModPath>();
    let edges: BTreeSet<_> = [(m("a"), m("b::x")), (m("b::y"), m("a"))]
        .into_iter()
        .collect();
    assert!(find_cycle(&collapse(&edges, &[])).is_some());
    let edges: BTreeSet<_> = [(m("b::x"), m("b::y")), (m("b::y::z"), m("b::x"))]
        .into_iter()
        .collect();
    assert!(find_cycle(&collapse(&edges, &m("b"))).is_some());
    assert!(find_cycle(&collapse(&edges, &[])).is_none());
    let facade: BTreeSet<_> = [(m("b"), m("b::x")), (m("b::x"), m("b"))]
        .into_iter()
        .collect();
    assert!(find_cycle(&collapse(&facade, &m("b"))).is_none());
    let known: BTreeSet<ModPath> = [m("a"), m("b"), m("b::x")].into_iter().collect();
    let refs = referenced_paths(
        "use crate::{a::T, b::{x::{U, V}, W}};\nfn f() { super::a::g() }",
        &m("b::x"),
    );
    let resolved: BTreeSet<_> = refs.iter().filter_map(|r| resolve(&known, r)).collect();
    assert_eq!(
        resolved,
        [m("a"), m("b"), m("b::x")].into_iter().collect(),
        "{refs:?}"
    );
}

/// Every `.rs` file of the library (not the binaries) by module path.
fn module_files(src: &Path) -> BTreeMap<ModPath, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(src).unwrap();
            if path.is_dir() {
                if rel != Path::new("bin") {
                    stack.push(path);
                }
                continue;
            }
            if path.extension().is_some_and(|e| e == "rs") && rel != Path::new("lib.rs") {
                let mut m: ModPath = rel
                    .with_extension("")
                    .iter()
                    .map(|s| s.to_string_lossy().into_owned())
                    .collect();
                if m.last().is_some_and(|l| l == "mod") {
                    m.pop();
                }
                out.insert(m, path);
            }
        }
    }
    out
}

/// The source without comments, string and char literals, and the unit-test module.
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += text[i + 2..].find("*/").map_or(b.len(), |j| j + 4);
        } else if b[i..].starts_with(b"'\"'") || b[i..].starts_with(b"'\\\"'") {
            i += if b[i + 1] == b'"' { 3 } else { 4 };
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i..].starts_with(b"r#\"") || b[i..].starts_with(b"r\"") {
            let hashes = usize::from(b[i + 1] == b'#');
            let close = if hashes == 1 { "\"#" } else { "\"" };
            let start = i + 2 + hashes;
            i = text[start..]
                .find(close)
                .map_or(b.len(), |j| start + j + close.len());
            out.push_str("\"\"");
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    out
}

/// Every absolute module path the code names through `crate::` or `super::`.
fn referenced_paths(code: &str, module: &ModPath) -> Vec<ModPath> {
    let mut out = Vec::new();
    for (root, base) in [("crate::", Vec::new()), ("super::", parent_of(module))] {
        let mut rest = code;
        while let Some(i) = rest.find(root) {
            let preceded = rest[..i].chars().next_back();
            rest = &rest[i + root.len()..];
            if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            expand_tree(rest, base.clone(), &mut out);
        }
    }
    out
}

/// The module `super::` names from `module` (its file's parent module).
fn parent_of(module: &ModPath) -> ModPath {
    module[..module.len().saturating_sub(1)].to_vec()
}

/// Expands one path or `use` tree starting at `s` (after `crate::`) into full paths.
fn expand_tree(s: &str, prefix: ModPath, out: &mut Vec<ModPath>) -> usize {
    let mut path = prefix;
    let mut i = 0;
    let b = s.as_bytes();
    loop {
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i > start {
            path.push(s[start..i].to_owned());
        }
        let group = if s[i..].starts_with("::{") {
            Some(3)
        } else {
            (i == 0 && s.starts_with('{')).then_some(1)
        };
        if let Some(skip) = group {
            i += skip;
            loop {
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                if i >= b.len() || b[i] == b'}' {
                    break;
                }
                i += expand_tree(&s[i..], path.clone(), out);
                while i < b.len() && b[i] != b',' && b[i] != b'}' {
                    i += 1;
                }
                if i < b.len() && b[i] == b',' {
                    i += 1;
                }
            }
            return i + 1;
        }
        if s[i..].starts_with("::") {
            i += 2;
            continue;
        }
        if !path.is_empty() {
            out.push(path);
        }
        return i;
    }
}

/// The longest known module that is a prefix of `path`.
fn resolve(known: &BTreeSet<ModPath>, path: &ModPath) -> Option<ModPath> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
}

/// The edges between units: top-level modules for `folder = []`, otherwise the direct children
/// of `folder` (edges that leave the folder, or touch its `mod.rs`, are not counted).
fn collapse(
    edges: &BTreeSet<(ModPath, ModPath)>,
    folder: &[String],
) -> BTreeMap<String, BTreeSet<String>> {
    let unit = |m: &ModPath| -> Option<String> {
        (m.len() > folder.len() && m.starts_with(folder)).then(|| m[folder.len()].clone())
    };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in edges {
        if let (Some(a), Some(b)) = (unit(from), unit(to)) {
            if a != b {
                graph.entry(a).or_default().insert(b);
            }
        }
    }
    graph
}

/// The modules of `graph` that sit on a cycle, grouped by strongly connected component
/// (`a, b, c`), one string for all, if there is any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            for next in graph.get(&n).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|n| (n, reach(n))).collect();
    let mut groups: BTreeSet<Vec<String>> = BTreeSet::new();
    for (n, r) in &reachable {
        if r.contains(*n) {
            let group = r
                .iter()
                .filter(|m| reachable.get(m).is_some_and(|rm| rm.contains(*n)));
            groups.insert(group.cloned().collect());
        }
    }
    let shown: Vec<String> = groups
        .iter()
        .map(|g| {
            let edges = g.iter().flat_map(|a| {
                graph[a]
                    .iter()
                    .filter(|b| g.contains(b))
                    .map(move |b| format!("{a}→{b}"))
            });
            format!("[{}]", edges.collect::<Vec<_>>().join(" "))
        })
        .collect();
    (!shown.is_empty()).then(|| shown.join("; "))
}

#[allow(dead_code)]
fn find_one_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    fn visit<'a>(
        n: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, bool>,
        stack: &mut Vec<&'a str>,
    ) -> Option<String> {
        match state.get(n) {
            Some(true) => {
                let from = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut c: Vec<&str> = stack[from..].to_vec();
                c.push(n);
                return Some(c.join(" → "));
            }
            Some(false) => return None,
            None => {}
        }
        state.insert(n, true);
        stack.push(n);
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n, false);
        None
    }
    let mut state = BTreeMap::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut state, &mut Vec::new()))
}
