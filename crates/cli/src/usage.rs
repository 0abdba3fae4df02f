//! Command-line usage errors reported in QEMU's style (`qemu-img`, `qemu-storage-daemon`).
//!
//! QEMU's tools print `PROGRAM: unrecognized option '--x'` and exit with code 1 on a usage
//! error. clap's default would exit with 2, which `check` already uses for "corrupt", so
//! every usage error here exits with 1, as QEMU's do.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// Exit code of every usage error, as in `qemu-img` and `qemu-storage-daemon`.
pub const USAGE_EXIT_CODE: u8 = 1;

/// How a clap error is to be reported.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// Help or version output that clap prints itself, with its own exit code.
    ClapOutput,
    /// A usage error: the lines to print on stderr, then exit with [`USAGE_EXIT_CODE`].
    Usage(Vec<String>),
}

/// Turns a clap error for the command line `args` (program name first) into QEMU's wording.
pub fn report(error: &clap::Error, args: &[String]) -> Report {
    let program = match error.kind() {
        ErrorKind::InvalidSubcommand => "imgstream".to_string(),
        _ => program_name(args),
    };
    let first_line = match error.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => return Report::ClapOutput,
        ErrorKind::UnknownArgument => match context_string(error, ContextKind::InvalidArg) {
            Some(option) => format!("{program}: unrecognized option '{option}'"),
            None => format!("{program}: {}", clap_message(error)),
        },
        ErrorKind::InvalidSubcommand => match context_string(error, ContextKind::InvalidSubcommand)
        {
            Some(name) => format!("{program}: Command not found: {name}"),
            None => format!("{program}: {}", clap_message(error)),
        },
        ErrorKind::InvalidValue if value_is_missing(error, args) => {
            match context_string(error, ContextKind::InvalidArg) {
                Some(option) => format!(
                    "{program}: option '{}' requires an argument",
                    option_name(&option)
                ),
                None => format!("{program}: {}", clap_message(error)),
            }
        }
        _ => format!("{program}: {}", clap_message(error)),
    };
    Report::Usage(vec![
        first_line,
        format!("Try '{program} --help' for more information"),
    ])
}

/// `imgstream` followed by the subcommand, when the command line names one.
fn program_name(args: &[String]) -> String {
    match args.get(1) {
        Some(command) if !command.starts_with('-') => format!("imgstream {command}"),
        _ => "imgstream".to_string(),
    }
}

fn context_string(error: &clap::Error, kind: ContextKind) -> Option<String> {
    match error.get(kind)? {
        ContextValue::String(value) => Some(value.clone()),
        ContextValue::Strings(values) => values.first().cloned(),
        _ => None,
    }
}

/// clap's message on one line, without its `error: ` prefix, usage and tips (the paragraph
/// up to the first blank line).
fn clap_message(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let paragraph: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = paragraph.join(" ");
    message
        .strip_prefix("error: ")
        .unwrap_or(&message)
        .to_string()
}

/// `--blockdev <BLOCKDEV>` as clap names an option: the option alone.
fn option_name(described: &str) -> &str {
    described.split_whitespace().next().unwrap_or(described)
}

/// clap reports an option given without its value as an invalid (empty) value; QEMU says the
/// option "requires an argument". The value is missing when the option is the last argument.
fn value_is_missing(error: &clap::Error, args: &[String]) -> bool {
    let Some(option) = context_string(error, ContextKind::InvalidArg) else {
        return false;
    };
    let empty = matches!(
        error.get(ContextKind::InvalidValue),
        Some(ContextValue::String(value)) if value.is_empty()
    );
    empty && args.last().map(String::as_str) == Some(option_name(&option))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Cli;
    use clap::Parser;

    fn usage_lines(args: &[&str]) -> Vec<String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let error = Cli::try_parse_from(&args).expect_err("the command line is wrong");
        match report(&error, &args) {
            Report::Usage(lines) => lines,
            Report::ClapOutput => panic!("{args:?} is not a usage error"),
        }
    }

    #[test]
    fn unknown_option_is_named_as_qemu_names_it() {
        assert_eq!(
            usage_lines(&["imgstream", "serve", "--bogus"]),
            [
                "imgstream serve: unrecognized option '--bogus'",
                "Try 'imgstream serve --help' for more information"
            ]
        );
    }

    #[test]
    fn option_without_its_value_requires_an_argument() {
        assert_eq!(
            usage_lines(&["imgstream", "serve", "--blockdev"])[0],
            "imgstream serve: option '--blockdev' requires an argument"
        );
    }

    #[test]
    fn unknown_command_is_not_found() {
        assert_eq!(
            usage_lines(&["imgstream", "frob"])[0],
            "imgstream: Command not found: frob"
        );
    }

    #[test]
    fn other_errors_keep_clap_wording_on_one_line() {
        assert_eq!(
            usage_lines(&["imgstream", "info"])[0],
            "imgstream info: the following required arguments were not provided: <FILE>"
        );
    }

    #[test]
    fn help_is_left_to_clap() {
        let args = ["imgstream".to_string(), "--help".to_string()];
        let error = Cli::try_parse_from(&args).expect_err("help stops parsing");
        assert_eq!(report(&error, &args), Report::ClapOutput);
    }
}
