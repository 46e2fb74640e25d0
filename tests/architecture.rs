//! The module graph has no import circles (issue 22): a module that imports another must not
//! be imported by it, directly or around a loop, at any level (`crate::backend` and
//! `crate::store`; `store::attachments` and `store::blob_index`).
//!
//! Reads every `crate::…` and `super::…` path in src/ (no build needed) and fails on a circle
//! that is not in `KNOWN`, and on a `KNOWN` entry that no longer exists, so the list only
//! shrinks. Remove an entry when you break its circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Circles that existed when this test was written, each as its sorted members under their
/// parent ("" for the crate root). Issue 22 takes them apart.
const KNOWN: &[(&str, &[&str])] = &[
    ("", &["backend", "store"]),
    ("store", &["attachments", "blob_index", "hash"]),
    ("store", &["collection", "incremental"]),
];

fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

/// Every module path a file refers to (`crate::a::b::Item` gives `a::b::Item`; the caller
/// cuts it to the modules that exist).
fn references(text: &str, me: &[String], is_mod_rs: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let bytes: Vec<char> = text.chars().collect();
    let s: String = bytes.iter().collect();
    for (prefix, base) in [
        ("crate::", Vec::new()),
        ("super::", {
            // `super` of a mod.rs file is its directory's parent; of a plain file, its dir.
            let mut b = me.to_vec();
            b.pop();
            if is_mod_rs {
                b.pop();
            }
            b
        }),
    ] {
        let mut from = 0;
        while let Some(i) = s[from..].find(prefix) {
            let at = from + i;
            from = at + prefix.len();
            if at > 0 && s[..at].chars().last().is_some_and(ident) {
                continue;
            }
            let mut path = base.clone();
            let rest = &s[from..];
            let mut seg = String::new();
            for c in rest.chars() {
                if ident(c) {
                    seg.push(c);
                } else if c == ':' {
                    if !seg.is_empty() {
                        path.push(std::mem::take(&mut seg));
                    }
                } else {
                    break;
                }
            }
            if !seg.is_empty() {
                path.push(seg);
            }
            // `use crate::store::{a, b}`: each item of a brace group.
            if let Some(brace) = rest.find('{')
                && rest[..brace].chars().all(|c| ident(c) || c == ':')
                && let Some(end) = rest[brace..].find('}')
            {
                for item in rest[brace + 1..brace + end].split(',') {
                    let mut p = path.clone();
                    p.extend(
                        item.trim()
                            .split("::")
                            .filter(|x| !x.is_empty() && x.chars().all(ident))
                            .map(String::from),
                    );
                    out.push(p);
                }
            }
            out.push(path);
        }
    }
    out
}

/// Tarjan's strongly connected components of one scope's graph, those of two or more.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        n: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.n);
        t.low.insert(v, t.n);
        t.n += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.g.get(v) {
            for w in ws {
                let w = w.as_str();
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let l = t.low[w].min(t.low[v]);
                    t.low.insert(v, l);
                } else if t.on.contains(w) {
                    let l = t.index[w].min(t.low[v]);
                    t.low.insert(v, l);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut c = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                c.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                c.sort();
                t.out.push(c);
            }
        }
    }
    let mut t = T {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        n: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_new_import_circle_between_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let modules: BTreeSet<Vec<String>> = files
        .iter()
        .map(|f| module_of(f.strip_prefix(&src).unwrap()))
        .collect();
    // Scope (a parent module) -> edges between its children.
    let mut scopes: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let me = module_of(rel);
        if me.is_empty() {
            continue; // lib.rs / main.rs only declare modules
        }
        let is_mod = rel.file_name().is_some_and(|n| n == "mod.rs");
        let text = std::fs::read_to_string(f).unwrap();
        for mut r in references(&text, &me, is_mod) {
            // Cut the path to the longest module that exists.
            while !r.is_empty() && !modules.contains(&r) {
                r.pop();
            }
            if r.is_empty() {
                continue;
            }
            // The scope is the common prefix; the edge joins the children under it.
            let common = me.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if common == me.len() || common == r.len() {
                continue; // a module and its own descendant or ancestor
            }
            scopes
                .entry(me[..common].to_vec())
                .or_default()
                .entry(me[common].clone())
                .or_default()
                .insert(r[common].clone());
        }
    }
    let mut found: BTreeSet<(String, Vec<String>)> = BTreeSet::new();
    for (scope, g) in &scopes {
        for c in circles(g) {
            found.insert((scope.join("::"), c));
        }
    }
    let known: BTreeSet<(String, Vec<String>)> = KNOWN
        .iter()
        .map(|(s, m)| (s.to_string(), m.iter().map(|x| x.to_string()).collect()))
        .collect();
    let new: Vec<_> = found.difference(&known).collect();
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(
        new.is_empty(),
        "import circles (scope, members) not in KNOWN: {new:?}\nedges: {scopes:#?}"
    );
    assert!(
        gone.is_empty(),
        "these KNOWN circles are gone (or changed): remove them from KNOWN: {gone:?}\nnow: {found:?}"
    );
}
