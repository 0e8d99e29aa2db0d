//! Aligned text tables, as kubectl prints them.

/// `rows` under `headers`, each column as wide as its widest cell, two spaces apart, each
/// line indented by two. The last column is not padded.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
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
