//! Aligned text tables, as kubectl prints them.
//!
//! Much of what the plugin prints is other people's text: a pod's role annotation is its
//! namespace's tenants', an agent's version its own. Printed as it is, an escape sequence in
//! it could rewrite what the operator's terminal shows (hide a refusal, retitle the window)
//! and a newline forge a line of the report. So every such text, each cell here included, is
//! printed through [`Escaped`], as the daemons write it in their logs: control characters,
//! line separators and bidirectional formatting characters written as `\n`, `\u{1b}`…

pub use podiam_runtime::telemetry::Escaped;
use podiam_runtime::telemetry::breaks_lines;

/// `value` as JSON (`pretty`, or one line) that is as safe on a terminal as [`Escaped`]
/// text: serde_json escapes the C0 controls, and this the rest [`Escaped`] escapes (DEL, the
/// C1 controls — `\u009b` starts a terminal command as ESC [ does —, the line separators
/// and the bidirectional formatting characters) as `\uXXXX`. Outside its strings JSON is
/// ASCII, so these stand only inside strings, where the escape means the same character: a
/// program reading the output gets what it would have.
pub fn json_text(value: &impl serde::Serialize, pretty: bool) -> serde_json::Result<String> {
    let text = if pretty {
        serde_json::to_string_pretty(value)?
    } else {
        serde_json::to_string(value)?
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if u32::from(c) >= 0x7f && breaks_lines(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// `rows` under `headers`, each column as wide as its widest cell, two spaces apart, each
/// line indented by two. The last column is not padded.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| Escaped(cell).to_string()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows) {
        let mut line = String::from(" ");
        for (i, cell) in row.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or_default();
            line.push(' ');
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(width - cell.chars().count() + 1));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_printed_safe_for_a_terminal_and_means_the_same() {
        let value = serde_json::json!({
            "role": "app\u{1b}]0;owned\u{7}\r\nrefused\u{9b}2J\u{202e}x\u{7f}\u{2028}é",
        });
        for pretty in [true, false] {
            let text = json_text(&value, pretty).expect("JSON");
            assert!(
                text.chars()
                    .all(|c| !breaks_lines(c) || (pretty && c == '\n')),
                "{text:?}"
            );
            assert!(
                text.contains("\\u009b") && text.contains("\\u202e"),
                "{text}"
            );
            assert!(text.contains('é'), "{text}");
            let back: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            assert_eq!(back, value);
        }
    }

    #[test]
    fn what_a_terminal_would_act_on_is_shown_escaped() {
        assert_eq!(Escaped("app-reader ok é").to_string(), "app-reader ok é");
        assert_eq!(
            Escaped("app\u{1b}]0;owned\u{7}\r\nrefused\u{9b}2J\u{202e}x").to_string(),
            "app\\u{1b}]0;owned\\u{7}\\r\\nrefused\\u{9b}2J\\u{202e}x"
        );
        let text = table(&["ROLE"], vec![vec!["a\u{1b}[2Jb".into()]]);
        assert_eq!(text, "  ROLE\n  a\\u{1b}[2Jb\n");
    }

    #[test]
    fn columns_align() {
        let text = table(
            &["NAME", "STATE"],
            vec![
                vec!["a-long-name".into(), "ready".into()],
                vec!["b".into(), "not synced yet".into()],
            ],
        );
        assert_eq!(
            text,
            "  NAME         STATE\n  a-long-name  ready\n  b            not synced yet\n"
        );
    }
}
