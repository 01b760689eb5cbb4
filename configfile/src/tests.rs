use super::*;
use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "tool")]
struct Cli {
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[arg(long, global = true, default_value = "/var/lib/tool")]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Serve {
        #[arg(long, default_value = "127.0.0.1:1")]
        listen: String,
        #[arg(long = "name")]
        names: Vec<String>,
        #[arg(long)]
        verbose: bool,
        #[arg(long, env = "TOOL_TEST_FROM_ENV")]
        from_env: Option<String>,
        #[arg(long)]
        port: Option<u16>,
    },
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    Status {
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    Revoke {
        node: String,
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
}

fn parse(args: &[&str], toml: &str) -> Result<Cli, String> {
    let argv: Vec<OsString> = std::iter::once("tool")
        .chain(["--config", "/etc/tool.toml"])
        .chain(args.iter().copied())
        .map(OsString::from)
        .collect();
    let argv = expand_with(&Cli::command(), argv, Path::new("/etc/tool.toml"), toml)
        .map_err(|e| e.to_string())?;
    Cli::try_parse_from(argv).map_err(|e| e.to_string())
}

#[test]
fn the_file_sets_every_kind_of_option_and_the_command_line_wins() {
    let file = r#"
        data-dir = "/srv/tool"
        state-dir = "/srv/state"
        [serve]
        listen = "0.0.0.0:7443"
        name = ["a.example", "10.0.0.5"]
        verbose = true
        port = 8080
    "#;
    let cli = parse(&["serve"], file).unwrap();
    assert_eq!(cli.data_dir, PathBuf::from("/srv/tool"));
    let Cmd::Serve {
        listen,
        names,
        verbose,
        port,
        ..
    } = cli.command
    else {
        panic!("not serve")
    };
    assert_eq!(listen, "0.0.0.0:7443");
    assert_eq!(names, ["a.example", "10.0.0.5"]);
    assert!(verbose);
    assert_eq!(port, Some(8080));

    let cli = parse(
        &[
            "serve",
            "--listen",
            "127.0.0.2:9",
            "--name=cli.example",
            "--data-dir",
            "/cli",
        ],
        file,
    )
    .unwrap();
    assert_eq!(cli.data_dir, PathBuf::from("/cli"));
    let Cmd::Serve { listen, names, .. } = cli.command else {
        panic!("not serve")
    };
    assert_eq!(listen, "127.0.0.2:9");
    assert_eq!(
        names,
        ["cli.example"],
        "a repeated option is replaced, not merged"
    );

    // A top-level default reaches every subcommand that has the option.
    let cli = parse(&["status"], file).unwrap();
    let Cmd::Status { state_dir } = cli.command else {
        panic!("not status")
    };
    assert_eq!(state_dir, Some(PathBuf::from("/srv/state")));
}

#[test]
fn nested_tables_reach_nested_subcommands_and_positionals_stay_on_the_command_line() {
    let cli = parse(
        &["node", "revoke", "zone-a/web-1"],
        "[node.revoke]\nreason = \"key-compromise\"\n",
    )
    .unwrap();
    let Cmd::Node {
        command: NodeCmd::Revoke { node, reason },
    } = cli.command
    else {
        panic!("not node revoke")
    };
    assert_eq!(
        (node.as_str(), reason.as_str()),
        ("zone-a/web-1", "key-compromise")
    );
}

#[test]
fn a_switch_set_to_false_is_left_off() {
    let cli = parse(&["serve"], "[serve]\nverbose = false\n").unwrap();
    let Cmd::Serve { verbose, .. } = cli.command else {
        panic!("not serve")
    };
    assert!(!verbose);
}

#[test]
fn unknown_keys_wrong_shapes_and_positionals_are_refused_with_the_key_named() {
    for (file, want) in [
        ("lisen = \"x\"\n", "unknown key `lisen`"),
        ("[serve]\nlisen = \"x\"\n", "unknown key `serve.lisen`"),
        (
            "[serve]\nverbose = \"yes\"\n",
            "`serve.verbose` must be true or false",
        ),
        (
            "[serve]\nlisten = [\"a\", \"b\"]\n",
            "`serve.listen` must be a single value",
        ),
        ("[node.revoke]\nnode = \"x\"\n", "positional"),
        ("config = \"/other.toml\"\n", "cannot name another"),
        ("serve = 3\n", "must be a table"),
        ("[nope]\n", "unknown key `nope`"),
        ("[serve\n", "not valid TOML"),
    ] {
        let e = parse(&["serve"], file).unwrap_err();
        assert!(e.contains(want), "{file:?}: {e}");
        assert!(e.contains("/etc/tool.toml"), "{e}");
    }
    // A key for another subcommand is checked too, even when it is not the one invoked.
    let e = parse(&["status"], "[serve]\nlisen = \"x\"\n").unwrap_err();
    assert!(e.contains("serve.lisen"), "{e}");
}

#[test]
fn clap_still_validates_values_from_the_file() {
    let e = parse(&["serve"], "[serve]\nport = \"not-a-port\"\n").unwrap_err();
    assert!(e.contains("not-a-port"), "{e}");
}

#[test]
fn without_a_file_the_arguments_are_untouched() {
    let argv: Vec<OsString> = ["tool", "serve", "--listen", "x"]
        .into_iter()
        .map(OsString::from)
        .collect();
    if std::env::var_os(CONFIG_ENV).is_none() {
        assert_eq!(expand(&Cli::command(), argv.clone()).unwrap(), argv);
    }
    assert_eq!(
        config_path(&["tool", "--config=/a.toml", "serve"].map(OsString::from)),
        Some(PathBuf::from("/a.toml"))
    );
}

#[test]
fn docs_cover_every_visible_subcommand_and_three_shells() {
    let dir = tempfile::tempdir().unwrap();
    write_docs(Cli::command(), dir.path()).unwrap();
    for page in [
        "tool.1",
        "tool-serve.1",
        "tool-node.1",
        "tool-node-revoke.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join("man").join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let pages: Vec<String> = std::fs::read_dir(dir.path().join("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !pages.iter().any(|p| p.contains("help")),
        "no pages for clap's help subcommands: {pages:?}"
    );
    for f in ["tool.bash", "_tool", "tool.fish"] {
        assert!(dir.path().join("completions").join(f).exists(), "{f}");
    }
}
