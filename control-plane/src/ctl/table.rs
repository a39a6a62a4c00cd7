//! kubectl-like tables: upper-case headers, columns separated by three
//! spaces, no borders. Cells that would push a row past the width are cut
//! with "…", the widest column first.

/// The width tables fit by default.
pub const WIDTH: usize = 100;

pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    /// The table as text, every line at most `width` characters (unless
    /// even one character per column would not fit).
    pub fn render(&self, width: usize) -> String {
        const GAP: usize = 3;
        let columns = self.headers.len();
        let mut widths: Vec<usize> = (0..columns)
            .map(|c| {
                std::iter::once(&self.headers[c])
                    .chain(self.rows.iter().map(|r| &r[c]))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let total = |widths: &[usize]| widths.iter().sum::<usize>() + GAP * (columns - 1);
        while total(&widths) > width {
            let (widest, w) = widths
                .iter()
                .enumerate()
                .max_by_key(|(_, w)| **w)
                .map(|(i, w)| (i, *w))
                .expect("a table has columns");
            if w <= 8 {
                break;
            }
            widths[widest] = w - 1;
        }
        let mut out = String::new();
        for cells in std::iter::once(&self.headers).chain(self.rows.iter()) {
            let mut line = String::new();
            for (c, cell) in cells.iter().enumerate() {
                let text = cut(cell, widths[c]);
                line.push_str(&text);
                if c + 1 < columns {
                    let pad = widths[c] - text.chars().count() + GAP;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_long_cells_are_cut_to_fit() {
        let mut table = Table::new(&["NAME", "ENDPOINT"]);
        table.row(vec!["a".into(), "https://short/v1".into()]);
        table.row(vec!["bbbb".into(), "x".repeat(120)]);
        let text = table.render(40);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME   ENDPOINT");
        assert_eq!(lines[1], "a      https://short/v1");
        assert_eq!(lines[2].chars().count(), 40);
        assert!(lines[2].ends_with('…'));
    }
}
