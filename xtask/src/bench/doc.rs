//! Writing the suites' sections into their regions of `docs/benchmarks.md`.

use std::{fs, path::Path};

use anyhow::{Context, Result};

use super::Section;

/// The markers around a region.
fn markers(region: &str) -> (String, String) {
    (
        format!("<!-- bench:{region}:begin -->"),
        format!("<!-- bench:{region}:end -->"),
    )
}

/// Replaces the `machine` region and each section's region of the file at
/// `path`; a region the file does not have yet is appended at its end.
pub fn write_regions(path: &Path, machine: &str, sections: &[Section]) -> Result<()> {
    let mut text =
        fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    text = replace_region(&text, "machine", machine);
    for section in sections {
        text = replace_region(&text, section.suite.region(), &section.markdown);
    }
    fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// `text` with the region named `region` holding `body` (generated text
/// between the markers, the markers kept).
pub fn replace_region(text: &str, region: &str, body: &str) -> String {
    let (begin, end) = markers(region);
    let body = body.trim_end();
    let block = format!("{begin}\n{body}\n{end}");
    if let Some(start) = text.find(&begin)
        && let Some(len) = text[start..].find(&end)
    {
        let stop = start + len + end.len();
        return format!("{}{block}{}", &text[..start], &text[stop..]);
    }
    let mut out = text.trim_end().to_owned();
    out.push_str("\n\n");
    out.push_str(&block);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_replaced_in_place_and_the_rest_kept() {
        let text =
            "# B\n\nintro\n<!-- bench:resp:begin -->\nold\ntable\n<!-- bench:resp:end -->\nafter\n";
        let out = replace_region(text, "resp", "new\n");
        assert_eq!(
            out,
            "# B\n\nintro\n<!-- bench:resp:begin -->\nnew\n<!-- bench:resp:end -->\nafter\n"
        );
        // Idempotent.
        assert_eq!(replace_region(&out, "resp", "new"), out);
    }

    #[test]
    fn a_missing_region_is_appended_and_others_left_alone() {
        let text = "# B\n<!-- bench:grpc:begin -->\ng\n<!-- bench:grpc:end -->\n";
        let out = replace_region(text, "resp", "r");
        assert_eq!(
            out,
            "# B\n<!-- bench:grpc:begin -->\ng\n<!-- bench:grpc:end -->\n\n<!-- bench:resp:begin -->\nr\n<!-- bench:resp:end -->\n"
        );
    }
}
