//! What a podiam command accepts, read off its clap `--help`: the deploy and docs suites hold
//! manifests and documentation to it.

use std::collections::BTreeSet;

/// Flags and environment variables one command accepts.
#[derive(Debug, Default)]
pub struct Help {
    pub flags: BTreeSet<String>,
    pub envs: BTreeSet<String>,
}

/// Parses clap's help: a flag is defined on a line indented at most 6 columns
/// (`  -h, --help`, `      --listen <LISTEN>`), never in a description (indented 10, or
/// after the flag on the same line); environment variables are clap's `[env: NAME=]`.
pub fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if line.len() - trimmed.len() <= 6 {
            let definition = match trimmed.split_once(", ") {
                Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
                _ => trimmed,
            };
            if let Some(rest) = definition.strip_prefix("--") {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                help.flags.insert(format!("--{name}"));
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("[env: ") {
            rest = &rest[at + 6..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            help.envs.insert(name);
        }
    }
    help
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_envs_are_read_from_their_definitions_only() {
        let text = "Usage: x [OPTIONS]\n\nOptions:\n      --listen <LISTEN>\n          Where; see --not-a-flag\n          \n          [env: PODIAM_LISTEN=]\n  -h, --help\n          Print help\n";
        let help = parse_help(text);
        assert_eq!(
            help.flags.iter().map(String::as_str).collect::<Vec<_>>(),
            ["--help", "--listen"]
        );
        assert_eq!(
            help.envs.iter().map(String::as_str).collect::<Vec<_>>(),
            ["PODIAM_LISTEN"]
        );
    }
}
