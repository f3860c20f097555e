//! The layers of `src/` (issue 17.1): the top-level modules form a graph
//! without cycles, and no product module imports the tooling.
//!
//! The graph is read from the source text: every `crate::a::…` path (also in
//! `use crate::{a, b::…}` groups and inside macro arguments) and every
//! `super::…` chain that climbs out of its top-level module. Comments and
//! string literals are skipped. `main.rs` (the binary, which wires product and
//! tooling verbs together) and `lib.rs` (the list of modules) are not nodes.
//!
//! `cargo test --test it layers:: -- --nocapture` prints the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Stand-ins and test drivers; the product must not depend on them.
const TOOLING: &[&str] = &["tools"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src").map(|e| e.expect("dir entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file, relative to `src/` (`store/redis/usage.rs` ->
/// `["store", "redis", "usage"]`, `store/mod.rs` -> `["store"]`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// Rust source as identifiers, `::` and punctuation; comments, string, byte
/// string, raw string and char literals dropped (lifetimes kept as idents).
fn tokens(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if (ch == 'r' || ch == 'b')
            && !c.get(i.wrapping_sub(1)).is_some_and(|p| p.is_alphanumeric() || *p == '_')
            && raw_string_len(&c[i..]).is_some()
        {
            i += raw_string_len(&c[i..]).unwrap_or(1);
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if c.get(i + 1) == Some(&'\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            // `b"..."`: the prefix is not an identifier.
            if i - start == 1 && (ch == 'b') && c.get(i) == Some(&'"') {
                continue;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push(Tok::PathSep);
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(Tok::Punct(ch));
            }
            i += 1;
        }
    }
    out
}

/// The length of a raw (byte) string literal starting here, if one does.
fn raw_string_len(c: &[char]) -> Option<usize> {
    let mut i = 0;
    if c.get(i) == Some(&'b') {
        i += 1;
    }
    if c.get(i) != Some(&'r') {
        return None;
    }
    i += 1;
    let mut hashes = 0;
    while c.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    if c.get(i) != Some(&'"') {
        return None;
    }
    i += 1;
    while i < c.len() {
        if c[i] == '"' && (0..hashes).all(|h| c.get(i + 1 + h) == Some(&'#')) {
            return Some(i + 1 + hashes);
        }
        i += 1;
    }
    Some(c.len())
}

/// The first segments of the elements of a `{ a, b::c, self }` group starting
/// at `open` (the `{`).
fn group_heads(t: &[Tok], open: usize) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for tok in &t[open..] {
        match tok {
            Tok::Punct('{') => {
                depth += 1;
                if depth == 1 {
                    expect_head = true;
                    continue;
                }
            }
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Tok::Punct(',') if depth == 1 => {
                expect_head = true;
                continue;
            }
            Tok::Ident(name) if depth == 1 && expect_head => heads.push(name.clone()),
            _ => {}
        }
        expect_head = false;
    }
    heads
}

/// The top-level modules a file's code refers to.
fn references(src: &str, file_module: &[String]) -> BTreeSet<String> {
    let t = tokens(src);
    let mut found = BTreeSet::new();
    // Inline `mod name {` blocks: (name, brace depth inside it).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < t.len() {
        match &t[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Punct('{'))) = (t.get(i + 1), t.get(i + 2)) {
                    inline.push((name.clone(), depth + 1));
                }
            }
            // `$crate::` is a macro's own crate, not a path here.
            Tok::Ident(kw)
                if kw == "crate" && t.get(i + 1) == Some(&Tok::PathSep) && (i == 0 || t[i - 1] != Tok::Punct('$')) =>
            {
                match t.get(i + 2) {
                    Some(Tok::Ident(name)) => {
                        found.insert(name.clone());
                    }
                    Some(Tok::Punct('{')) => found.extend(group_heads(&t, i + 2)),
                    _ => {}
                }
            }
            Tok::Ident(kw)
                if kw == "super"
                    && t.get(i + 1) == Some(&Tok::PathSep)
                    && (i < 2 || !(t[i - 1] == Tok::PathSep && t[i - 2] == Tok::Ident("super".into()))) =>
            {
                // A `super::super::…` chain: climb from this (inline) module.
                let mut path: Vec<String> = file_module.to_vec();
                path.extend(inline.iter().map(|(n, _)| n.clone()));
                let mut j = i;
                while t.get(j) == Some(&Tok::Ident("super".into())) && t.get(j + 1) == Some(&Tok::PathSep) {
                    path.pop();
                    j += 2;
                }
                if path.is_empty() {
                    match t.get(j) {
                        Some(Tok::Ident(name)) => {
                            found.insert(name.clone());
                        }
                        Some(Tok::Punct('{')) => found.extend(group_heads(&t, j)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Edges `from -> to` between top-level modules (no self edges).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_path(f.strip_prefix(&src).expect("under src")).first().cloned())
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let module = module_path(file.strip_prefix(&src).expect("under src"));
        let Some(top) = module.first().filter(|m| modules.contains(*m)) else { continue };
        let text = std::fs::read_to_string(file).expect("read source");
        for to in references(&text, &module) {
            if modules.contains(&to) && to != *top {
                edges.get_mut(top).expect("node").insert(to);
            }
        }
    }
    edges
}

/// Every cycle's nodes (Tarjan's strongly connected components of size > 1).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.edges[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

fn print(edges: &BTreeMap<String, BTreeSet<String>>) {
    println!("top-level module graph of src/ (from -> to):");
    for (from, to) in edges {
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        println!("  {from:<11} -> {}", to.join(", "));
    }
}

#[test]
fn top_level_modules_form_no_cycle() {
    let edges = graph();
    print(&edges);
    let found = cycles(&edges);
    for c in &found {
        let between: Vec<String> = c
            .iter()
            .flat_map(|a| edges[a].iter().filter(|b| c.contains(b)).map(move |b| format!("{a} -> {b}")))
            .collect();
        println!("cycle among {c:?}: {}", between.join(", "));
    }
    assert!(found.is_empty(), "import cycles among top-level modules: {found:?}");
}

#[test]
fn product_imports_no_tooling() {
    let edges = graph();
    let bad: Vec<String> = edges
        .iter()
        .filter(|(from, _)| !TOOLING.contains(&from.as_str()))
        .flat_map(|(from, to)| {
            to.iter().filter(|t| TOOLING.contains(&t.as_str())).map(move |t| format!("{from} -> {t}"))
        })
        .collect();
    println!("product -> tooling edges: {bad:?}");
    assert!(bad.is_empty(), "product modules import the tooling: {bad:?}");
}

/// The reader itself: group imports, macro arguments, comments, strings and
/// `super` chains that stay inside their module.
#[test]
fn the_reader_sees_what_the_compiler_sees() {
    let src = r##"
        use crate::{a, b::{c, d}, self};
        // use crate::commented;
        /* crate::blocked */
        const S: &str = "crate::quoted";
        const R: &str = r#"crate::raw "quoted""#;
        fn f<'x>(c: char) { assert!(crate::in_macro::f(c == '"')); $crate::not_here; }
        mod tests { use super::*; use super::super::climbed; }
        use super::sibling;
    "##;
    let found = references(src, &["m".to_owned()]);
    let want: BTreeSet<String> =
        ["a", "b", "self", "in_macro", "climbed", "sibling"].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, want);
    let nested = references(
        "use super::peer; mod t { use super::super::inside; use super::super::super::up; }",
        &["m".to_owned(), "n".to_owned()],
    );
    assert_eq!(nested, ["up".to_owned()].into_iter().collect());
}

/// The crate docs' "Layout" list (`src/lib.rs`) names every top-level module
/// once, each below the modules it imports.
#[test]
fn the_layout_docs_list_every_module_in_layer_order() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).expect("read lib.rs");
    let listed: Vec<String> =
        lib.lines().filter_map(|l| l.strip_prefix("//! - [`")?.split('`').next().map(str::to_owned)).collect();
    let edges = graph();
    let mut sorted = listed.clone();
    sorted.sort();
    let modules: Vec<String> = edges.keys().cloned().collect();
    assert_eq!(sorted, modules, "the Layout list names each top-level module once");
    let pos = |m: &str| listed.iter().position(|l| l == m).expect("listed");
    let upward: Vec<String> = edges
        .iter()
        .flat_map(|(from, to)| to.iter().filter(|t| pos(t) > pos(from)).map(move |t| format!("{from} -> {t}")))
        .collect();
    assert!(upward.is_empty(), "modules listed above what they import: {upward:?}");
}

/// The crate docs' "Layout" list names every module of `src/` (nested ones
/// as `a::b`, one line each) and nothing that is not a module.
#[test]
fn the_layout_docs_name_every_module_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("read lib.rs");
    let listed: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| {
            let item = l.strip_prefix("//!")?.trim_start().strip_prefix("- ")?;
            let item = item.strip_prefix('[').unwrap_or(item);
            item.strip_prefix('`')?.split('`').next().map(str::to_owned)
        })
        .collect();
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_path(f.strip_prefix(&src).expect("under src")).join("::"))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let missing: Vec<&String> = modules.difference(&listed).collect();
    let stray: Vec<&String> = listed.difference(&modules).collect();
    assert!(missing.is_empty(), "modules the Layout list does not name: {missing:?}");
    assert!(stray.is_empty(), "Layout entries that are no module: {stray:?}");
}
