//! The shape of the code, checked: no module of a crate imports a module that imports it
//! back (directly or round a longer loop), and no function of the daemons, the decision
//! core, the contract, the runtime or the tools is longer than 80 lines (tests excepted).
//! No root needed. Debt being paid is listed in `KNOWN_CYCLES` and `KNOWN_LONG_FUNCTIONS`.
//!
//! Both read the sources as rustfmt leaves them: a module's dependencies are the
//! `crate::NAME` paths outside comments and outside its `#[cfg(test)]` module; a function
//! runs from its `fn` line to the `}` at the same indentation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose code runs in production or in operators' hands.
const CRATES: [&str; 7] = [
    "agent",
    "server",
    "policy",
    "proto",
    "runtime",
    "certs",
    "kubectl-iam",
];

/// The longest function allowed outside tests.
const MAX_FUNCTION_LINES: usize = 80;

/// Known debt, being paid (issue 14): each entry must still be a violation,
/// so that the list only shrinks, and nothing else may be one.
const KNOWN_CYCLES: &[&str] = &[];
const KNOWN_LONG_FUNCTIONS: &[&str] = &[];

/// Fails on any violation not in `known`, and on any entry of `known` that is no violation
/// any more (delete it).
fn check_against_debt(what: &str, found: &[String], known: &[&str]) {
    let new: Vec<&String> = found
        .iter()
        .filter(|f| !known.iter().any(|k| f.starts_with(k)))
        .collect();
    let paid: Vec<&&str> = known
        .iter()
        .filter(|k| !found.iter().any(|f| f.starts_with(**k)))
        .collect();
    assert!(
        new.is_empty() && paid.is_empty(),
        "{what}:\n  new: {new:#?}\n  paid (remove from the known list): {paid:#?}"
    );
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the tests crate")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A file's lines up to its test module (a `#[cfg(test)]` followed by an inline `mod`).
fn code_lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("readable source file");
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let end = lines
        .windows(2)
        .position(|pair| {
            pair[0].trim() == "#[cfg(test)]"
                && pair[1].trim_start().starts_with("mod ")
                && pair[1].trim_end().ends_with('{')
        })
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// The top-level module a file of `src` belongs to (`lib`/`main` for the crate root).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative
        .components()
        .next()
        .expect("a file name")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// The `crate::NAME` modules a line of code names.
fn crate_paths(line: &str, into: &mut BTreeSet<String>) {
    let code = line.split("//").next().unwrap_or_default();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or_default();
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                into.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            into.insert(name);
        }
    }
}

/// Module → the modules of the same crate it names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = rust_files(src);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let mut named = BTreeSet::new();
        for line in code_lines(file) {
            if !line.trim_start().starts_with("//") {
                crate_paths(&line, &mut named);
            }
        }
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(
            named
                .into_iter()
                .filter(|n| *n != module && modules.contains(n)),
        );
    }
    graph
}

/// Every loop of the graph, each as its modules in order from its smallest name.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        let last = path.last().expect("a start").clone();
        for next in graph.get(&last).into_iter().flatten() {
            if *next == path[0] {
                found.insert(path.clone());
            } else if next > &path[0] && !path.contains(next) {
                path.push(next.clone());
                walk(graph, path, found);
                path.pop();
            }
        }
    }
    let mut found = BTreeSet::new();
    for start in graph.keys() {
        walk(graph, &mut vec![start.clone()], &mut found);
    }
    found
}

/// Functions over the limit in `src`: (lines, file:line, name).
fn long_functions(src: &Path) -> Vec<(usize, String, String)> {
    let mut long = Vec::new();
    for file in rust_files(src) {
        let lines = code_lines(&file);
        let mut i = 0;
        while i < lines.len() {
            let Some((indent, name)) = function_start(&lines[i]) else {
                i += 1;
                continue;
            };
            // The signature may span lines; a `;` ends a declaration without a body.
            let mut open = i;
            while open < lines.len()
                && !lines[open].trim_end().ends_with('{')
                && !lines[open].trim_end().ends_with(';')
            {
                open += 1;
            }
            if open >= lines.len() || lines[open].trim_end().ends_with(';') {
                i = open + 1;
                continue;
            }
            let close = format!("{indent}}}");
            let end = (open + 1..lines.len())
                .find(|&k| lines[k] == close)
                .unwrap_or(lines.len() - 1);
            let length = end - i + 1;
            if length > MAX_FUNCTION_LINES {
                long.push((length, format!("{}:{}", file.display(), i + 1), name));
            }
            i = open + 1;
        }
    }
    long
}

/// `Some((indentation, name))` when the line starts a function.
fn function_start(line: &str) -> Option<(String, String)> {
    let indent: String = line.chars().take_while(|c| *c == ' ').collect();
    let mut words = line.split_whitespace().peekable();
    while let Some(word) = words.peek() {
        if word.starts_with("pub") || ["async", "const", "unsafe"].contains(word) {
            words.next();
        } else {
            break;
        }
    }
    if words.next()? != "fn" {
        return None;
    }
    let name: String = words
        .next()?
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    Some((indent, name))
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let mut found = Vec::new();
    for krate in CRATES.iter().copied().chain(["tests", "bench"]) {
        let src = workspace().join(krate).join("src");
        for cycle in cycles(&module_graph(&src)) {
            found.push(format!("{krate}: {}", cycle.join(" → ")));
        }
    }
    check_against_debt("import cycles", &found, KNOWN_CYCLES);
}

#[test]
fn no_function_outside_tests_is_longer_than_80_lines() {
    let mut found = Vec::new();
    for krate in CRATES {
        for (lines, at, name) in long_functions(&workspace().join(krate).join("src")) {
            let file = at.split(':').next().unwrap_or_default();
            let relative = Path::new(file)
                .strip_prefix(workspace())
                .map_or_else(|_| file.to_string(), |p| p.display().to_string());
            found.push(format!("{relative} {name} ({lines} lines, {at})"));
        }
    }
    check_against_debt(
        &format!("functions over {MAX_FUNCTION_LINES} lines"),
        &found,
        KNOWN_LONG_FUNCTIONS,
    );
}

#[test]
fn the_checks_see_a_cycle_and_a_long_function() {
    let dir = podiam_tests::process::scratch_dir("layout").expect("scratch directory");
    let src = dir.as_path();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\n").expect("write");
    std::fs::write(
        src.join("a.rs"),
        "use crate::b::B;\n// crate::c in a comment is no import\n",
    )
    .expect("write");
    std::fs::write(
        src.join("b.rs"),
        "use crate::{a, lib};\n#[cfg(test)]\nmod tests {\n    use crate::c;\n}\n",
    )
    .expect("write");
    std::fs::write(src.join("c.rs"), "").expect("write");
    let graph = module_graph(src);
    assert_eq!(
        cycles(&graph),
        BTreeSet::from([vec!["a".to_string(), "b".to_string()]])
    );
    assert!(!graph["a"].contains("c") && !graph["b"].contains("c"));

    let body = "    let x = 1;\n".repeat(MAX_FUNCTION_LINES);
    std::fs::write(
        src.join("c.rs"),
        format!("pub async fn long(\n    x: u8,\n) {{\n{body}}}\n\nfn short() {{}}\n"),
    )
    .expect("write");
    let long = long_functions(src);
    assert_eq!(long.len(), 1, "{long:?}");
    assert_eq!(long[0].2, "long");
    std::fs::remove_dir_all(&dir).expect("scratch directory removed");
}
