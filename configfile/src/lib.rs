//! Configuration files for the zonemesh binaries, and their man pages and shell completions.
//!
//! A configuration file is TOML whose keys are the long options of the command line
//! (`grpc-listen = "0.0.0.0:7443"` is `--grpc-listen 0.0.0.0:7443`). [`expand`] turns the
//! keys that apply to the invoked subcommand into arguments inserted before the real ones,
//! so clap validates both the same way, and every option a subcommand gains later is
//! available in the file without a change here. Layout:
//!
//! ```toml
//! # Top level: defaults for every subcommand that has the option.
//! data-dir = "/var/lib/zonemesh"
//! # A table per subcommand (nested for nested subcommands: [ca.issue-tls]).
//! [serve]
//! grpc-listen = "0.0.0.0:7443"
//! tls-name = ["ctl.corp.example", "10.0.0.5"]   # arrays repeat the option
//! ```
//!
//! Precedence: the command line, then the option's environment variable, then the
//! subcommand's table, then the top level, then the built-in default. A key that no
//! subcommand knows, a value of the wrong shape and a positional argument are refused with
//! the file and the key named.

pub mod process;

use clap::{Arg, ArgAction, Command};
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// The option that names the configuration file (and its environment variable).
pub const CONFIG_OPTION: &str = "config";
/// Environment variable naming the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "ZONEMESH_CONFIG";

/// Why a configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("configuration file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key that is neither an option nor a subcommand table.
    #[error("configuration file {path}: unknown key `{key}` (not an option of `{command}`)")]
    UnknownKey {
        path: PathBuf,
        key: String,
        command: String,
    },
    /// A key that names something the file cannot set.
    #[error("configuration file {path}: `{key}` cannot be set in a configuration file ({why})")]
    NotSettable {
        path: PathBuf,
        key: String,
        why: &'static str,
    },
    /// A value of the wrong shape for its option.
    #[error("configuration file {path}: `{key}` must be {expected}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
}

/// The configuration file the command line (or `ZONEMESH_CONFIG`) names, if any.
pub fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        // The global option comes before the subcommand: after it, `--config` may be the
        // subcommand's own (`zonemesh-agent tunnel --config FILE.json`).
        if s == "--" || !s.starts_with('-') {
            break;
        }
        if s == "--log" {
            it.next();
            continue;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `argv` with the settings of the configuration file (if one is named) inserted after the
/// invoked subcommand, before the arguments that were given. Without a file, `argv` as is.
pub fn expand(cmd: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(path) = config_path(&argv) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    expand_with(cmd, argv, &path, &text)
}

/// [`expand`] with the file's text already read (`path` only names it in errors).
pub fn expand_with(
    cmd: &Command,
    argv: Vec<OsString>,
    path: &Path,
    text: &str,
) -> Result<Vec<OsString>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })?;
    let mut cmd = cmd.clone();
    cmd.build();
    let file = File { path, root: &cmd };
    file.check_top(&table)?;

    let invoked = invoked(&cmd, &argv);
    let leaf = invoked.commands.last().copied().unwrap_or(&cmd);
    // Layers from the top level down to the leaf's table; a deeper layer wins.
    let mut layers: Vec<&toml::Table> = vec![&table];
    let mut t = &table;
    for c in &invoked.commands {
        match t.get(c.get_name()).and_then(toml::Value::as_table) {
            Some(sub) => {
                layers.push(sub);
                t = sub;
            }
            None => break,
        }
    }
    let mut chosen: Vec<(&Arg, &toml::Value, String)> = Vec::new();
    for (depth, layer) in layers.iter().enumerate() {
        for (key, value) in layer.iter() {
            if value.is_table() {
                continue;
            }
            let Some(arg) = find_long(leaf, key) else {
                // A top-level default for options this subcommand does not have.
                continue;
            };
            let dotted = dotted(&invoked.commands[..depth], key);
            chosen.retain(|(a, _, _)| a.get_id() != arg.get_id());
            chosen.push((arg, value, dotted));
        }
    }
    let mut extra = Vec::new();
    for (arg, value, key) in chosen {
        if invoked.given.contains(arg.get_id().as_str()) {
            continue;
        }
        if arg.get_env().is_some_and(|e| std::env::var_os(e).is_some()) {
            continue;
        }
        file.render(arg, value, &key, &mut extra)?;
    }
    let mut out = argv;
    let at = invoked.insert_at.min(out.len());
    out.splice(at..at, extra);
    Ok(out)
}

/// Man pages (`<bin>.1`, `<bin>-<sub>.1`, ...) of every visible subcommand into `out/man`,
/// and bash, zsh and fish completions into `out/completions`.
pub fn write_docs(cmd: Command, out: &Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    // No pages or completions for clap's own `help` subcommands.
    let mut cmd = without_help_subcommands(cmd);
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let comp = out.join("completions");
    std::fs::create_dir_all(&comp)?;
    let name = cmd.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &comp)?;
    }
    Ok(())
}

fn without_help_subcommands(cmd: Command) -> Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.disable_help_subcommand(true);
    for n in names {
        cmd = cmd.mut_subcommand(n, without_help_subcommands);
    }
    cmd
}

struct File<'a> {
    path: &'a Path,
    root: &'a Command,
}

impl File<'_> {
    fn unknown(&self, key: String, command: &Command) -> ConfigError {
        ConfigError::UnknownKey {
            path: self.path.to_path_buf(),
            key,
            command: command.get_bin_name().unwrap_or(command.get_name()).into(),
        }
    }

    /// The top level: subcommand tables, and defaults that some command of the tree has.
    fn check_top(&self, table: &toml::Table) -> Result<(), ConfigError> {
        for (key, value) in table {
            if let Some(sub) = find_sub(self.root, key) {
                let t = value.as_table().ok_or_else(|| ConfigError::Shape {
                    path: self.path.to_path_buf(),
                    key: key.clone(),
                    expected: "a table (it is a subcommand)",
                })?;
                self.check_table(sub, t, key)?;
                continue;
            }
            let Some(arg) = find_long_anywhere(self.root, key) else {
                return Err(self.unknown(key.clone(), self.root));
            };
            self.check_value(arg, value, key)?;
        }
        Ok(())
    }

    fn check_table(
        &self,
        cmd: &Command,
        table: &toml::Table,
        prefix: &str,
    ) -> Result<(), ConfigError> {
        for (key, value) in table {
            let dotted = format!("{prefix}.{key}");
            if let Some(sub) = find_sub(cmd, key) {
                let t = value.as_table().ok_or_else(|| ConfigError::Shape {
                    path: self.path.to_path_buf(),
                    key: dotted.clone(),
                    expected: "a table (it is a subcommand)",
                })?;
                self.check_table(sub, t, &dotted)?;
                continue;
            }
            let Some(arg) = find_long(cmd, key) else {
                return Err(self.unknown(dotted, cmd));
            };
            self.check_value(arg, value, &dotted)?;
        }
        Ok(())
    }

    fn check_value(&self, arg: &Arg, value: &toml::Value, key: &str) -> Result<(), ConfigError> {
        self.render(arg, value, key, &mut Vec::new())
    }

    fn shape(&self, key: &str, expected: &'static str) -> ConfigError {
        ConfigError::Shape {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            expected,
        }
    }

    /// The arguments that set `arg` to `value`.
    fn render(
        &self,
        arg: &Arg,
        value: &toml::Value,
        key: &str,
        out: &mut Vec<OsString>,
    ) -> Result<(), ConfigError> {
        let not_settable = |why| ConfigError::NotSettable {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            why,
        };
        if arg.get_id() == CONFIG_OPTION {
            return Err(not_settable("a configuration file cannot name another"));
        }
        let Some(long) = arg.get_long() else {
            return Err(not_settable("it is a positional argument"));
        };
        let flag = format!("--{long}");
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => {
                let on = value
                    .as_bool()
                    .ok_or_else(|| self.shape(key, "true or false (it is a switch)"))?;
                let set_true = matches!(arg.get_action(), ArgAction::SetTrue);
                if on == set_true {
                    out.push(flag.into());
                }
            }
            ArgAction::Count => {
                let n = value
                    .as_integer()
                    .filter(|n| (0..=64).contains(n))
                    .ok_or_else(|| self.shape(key, "a count from 0 to 64"))?;
                out.extend((0..n).map(|_| OsString::from(&flag)));
            }
            ArgAction::Set | ArgAction::Append => {
                let many = matches!(arg.get_action(), ArgAction::Append)
                    || arg.get_num_args().is_some_and(|r| r.max_values() > 1);
                match value {
                    toml::Value::Array(items) if many => {
                        for item in items {
                            let v = scalar(item)
                                .ok_or_else(|| self.shape(key, "an array of plain values"))?;
                            out.push(format!("{flag}={v}").into());
                        }
                    }
                    toml::Value::Array(_) => {
                        return Err(self.shape(key, "a single value (the option takes one)"));
                    }
                    v => {
                        let v = scalar(v).ok_or_else(|| self.shape(key, "a plain value"))?;
                        out.push(format!("{flag}={v}").into());
                    }
                }
            }
            _ => return Err(not_settable("it only prints help or the version")),
        }
        Ok(())
    }
}

/// A TOML value as the text of one command-line value.
fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

fn find_sub<'c>(cmd: &'c Command, name: &str) -> Option<&'c Command> {
    cmd.get_subcommands()
        .find(|s| s.get_name() == name && s.get_name() != "help")
}

fn find_long<'c>(cmd: &'c Command, long: &str) -> Option<&'c Arg> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long) || (a.is_positional() && a.get_id() == long))
}

fn find_long_anywhere<'c>(cmd: &'c Command, long: &str) -> Option<&'c Arg> {
    find_long(cmd, long).or_else(|| {
        cmd.get_subcommands()
            .find_map(|s| find_long_anywhere(s, long))
    })
}

fn dotted(path: &[&Command], key: &str) -> String {
    path.iter()
        .map(|c| c.get_name())
        .chain(std::iter::once(key))
        .collect::<Vec<_>>()
        .join(".")
}

/// What the command line invokes: the subcommand path, where its own arguments start, and
/// the ids of the options it gives.
struct Invoked<'c> {
    commands: Vec<&'c Command>,
    insert_at: usize,
    given: BTreeSet<String>,
}

fn invoked<'c>(root: &'c Command, argv: &[OsString]) -> Invoked<'c> {
    let mut cur = root;
    let mut inv = Invoked {
        commands: Vec::new(),
        insert_at: 1.min(argv.len()),
        given: BTreeSet::new(),
    };
    let mut i = 1;
    while i < argv.len() {
        let tok = argv[i].as_os_str();
        let s = tok.to_string_lossy();
        if s == "--" {
            break;
        }
        if let Some(rest) = s.strip_prefix("--") {
            let (name, inline) = match rest.split_once('=') {
                Some((n, _)) => (n, true),
                None => (rest, false),
            };
            if let Some(a) = find_long(cur, name) {
                inv.given.insert(a.get_id().to_string());
                if !inline && a.get_action().takes_values() {
                    i += 1;
                }
            }
        } else if s.len() > 1 && s.starts_with('-') {
            let shorts: Vec<char> = s[1..].chars().collect();
            for (n, c) in shorts.iter().enumerate() {
                if let Some(a) = cur.get_arguments().find(|a| a.get_short() == Some(*c)) {
                    inv.given.insert(a.get_id().to_string());
                    if a.get_action().takes_values() {
                        if n + 1 == shorts.len() {
                            i += 1;
                        }
                        break;
                    }
                }
            }
        } else if let Some(sub) = subcommand_named(cur, tok) {
            cur = sub;
            inv.commands.push(sub);
            inv.insert_at = i + 1;
        } else {
            // The first positional value of the leaf: no more subcommands.
            break;
        }
        i += 1;
    }
    inv
}

fn subcommand_named<'c>(cmd: &'c Command, tok: &OsStr) -> Option<&'c Command> {
    let name = tok.to_str()?;
    cmd.get_subcommands()
        .find(|s| s.get_name() == name || s.get_all_aliases().any(|a| a == name))
}

#[cfg(test)]
mod tests;
