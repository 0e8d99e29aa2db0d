//! Aligned text tables, as kubectl prints them, and text made safe to print on a terminal.

use std::borrow::Cow;

/// `text` as it may be printed on a terminal: every control character (escape sequences,
/// carriage returns, newlines, C1 controls) and every bidirectional formatting character
/// written as `\u{…}`. Much of what the plugin prints is other people's: a pod's role
/// annotation is its namespace's tenants', an agent's version its own; printed as they are,
/// an escape sequence in one could rewrite what the operator's terminal shows (hide a
/// refusal, retitle the window) and a newline forge a line of the report.
pub fn shown(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unprintable) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unprintable(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A control character, or one that changes the direction text is shown in.
fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `rows` under `headers`, each column as wide as its widest cell, two spaces apart, each
/// line indented by two. The last column is not padded.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| shown(cell).into_owned()).collect())
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
    fn what_a_terminal_would_act_on_is_shown_escaped() {
        assert!(matches!(shown("app-reader ok é"), Cow::Borrowed(_)));
        assert_eq!(
            shown("app\u{1b}]0;owned\u{7}\r\nrefused\u{9b}2J\u{202e}x"),
            "app\\u{1b}]0;owned\\u{7}\\u{d}\\u{a}refused\\u{9b}2J\\u{202e}x"
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
