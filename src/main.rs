use std::process::ExitCode;

use clap::Parser;

use agentmount::backend::StoreKind;
use agentmount::cli::{Cli, Command};
use agentmount::store::Store;
use agentmount::store::gc::GcOptions;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let prog = argv
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or("");
    // Installed as /sbin/mount.agentmount, mount(8) and /etc/fstab run us as a helper.
    let cli = if prog.starts_with("mount.") {
        match agentmount::cli::helper_args(&argv[1..]) {
            Ok(args) => Cli::parse_from(args),
            Err(e) => {
                eprintln!("mount.agentmount: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        Cli::parse()
    };
    match cli.command {
        Command::Mount { .. } => agentmount::mount::run_cli(cli.command),
        Command::Unmount { mountpoint, force } => {
            agentmount::mount::unmount_cli(&mountpoint, force)
        }
        Command::Watch {
            mountpoint,
            collection,
            id,
            since,
            json,
        } => agentmount::follow::run(
            &mountpoint,
            agentmount::follow::Filter {
                collection,
                id,
                since,
                json,
            },
        ),
        Command::Status { mountpoint } => match std::fs::read_to_string(mountpoint.join(".status"))
        {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "agentmount: cannot read {}: {e} (is it an agentmount mount?)",
                    mountpoint.join(".status").display()
                );
                ExitCode::from(1)
            }
        },
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: clap_complete panics if its writer fails (a closed pipe).
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "agentmount", &mut buf);
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &buf);
            ExitCode::SUCCESS
        }
        Command::Man { subcommand } => {
            let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
            cmd.build();
            let page = match &subcommand {
                None => cmd,
                Some(name) => match cmd.find_subcommand(name) {
                    Some(sub) => sub.clone(),
                    None => {
                        eprintln!(
                            "agentmount: no subcommand {name:?}; pages: {}",
                            cmd.get_subcommands()
                                .map(|c| c.get_name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                        return ExitCode::from(2);
                    }
                },
            };
            match clap_mangen::Man::new(page).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentmount: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Gc {
            store,
            grace,
            dry_run,
        } => {
            init_cli_logging();
            if let Err(e) = open_check(&store) {
                return e;
            }
            if agentmount::backend::detect(&store.layout().root).ok() == Some(StoreKind::Sqlite) {
                eprintln!(
                    "agentmount: {} is an arbiter database: it holds no attachments, so there is nothing to collect",
                    store.layout().root.display()
                );
                return ExitCode::from(1);
            }
            let s = match agentmount::backend::open(
                &store.config(false),
                std::path::Path::new("agentmount-gc"),
            ) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("agentmount: {e}");
                    return ExitCode::from(1);
                }
            };
            let Some(s) = s.attachments() else {
                eprintln!("agentmount: this store keeps no attachments");
                return ExitCode::from(1);
            };
            match s.gc(&GcOptions {
                grace_secs: grace,
                dry_run,
            }) {
                Ok(r) => {
                    println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    if r.errors.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => fail(&e),
            }
        }
        Command::Copy { from, to, quiet } => {
            init_cli_logging();
            match agentmount::copy::run(&from, &to, quiet) {
                Ok(()) => ExitCode::SUCCESS,
                Err(msg) => {
                    eprintln!("agentmount: copy: {msg}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Fsck { store, repair } => {
            init_cli_logging();
            if let Err(e) = open_check(&store) {
                return e;
            }
            let kind = agentmount::backend::detect(&store.layout().root);
            if repair && matches!(kind, Ok(StoreKind::Sqlite | StoreKind::Postgres)) {
                eprintln!(
                    "agentmount: fsck --repair mends directory stores; a database's problems are listed and left to whoever owns its rows"
                );
            }
            let r = match kind {
                Ok(StoreKind::Sqlite) => {
                    match agentmount::backend::sqlite::fsck(
                        &store.layout().root,
                        store.options(true),
                    ) {
                        Ok(r) => r,
                        Err(e) => return fail(&e),
                    }
                }
                Ok(StoreKind::Postgres) => {
                    match agentmount::backend::postgres::fsck(
                        store.layout().root.to_str().unwrap_or_default(),
                    ) {
                        Ok(r) => r,
                        Err(e) => return fail(&e),
                    }
                }
                Ok(StoreKind::Directory) => {
                    match Store::open_for_fsck(store.layout(), store.options(false), repair) {
                        Ok(s) if repair => s.fsck_repair(),
                        Ok(s) => s.fsck(),
                        Err(e) => return fail(&e),
                    }
                }
                Err(e) => return fail(&e),
            };
            // Lines name store files and ids another program chose: escaped, so none can
            // forge a line of the report.
            use agentmount::error::escape_text;
            for line in &r.repaired {
                println!("repaired: {}", escape_text(line));
            }
            for line in &r.problems {
                println!("problem: {}", escape_text(line));
            }
            println!(
                "fsck: {} files checked, {} problems, {} repaired",
                r.checked_files,
                r.problems.len(),
                r.repaired.len()
            );
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn init_cli_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A store named on the command line must exist (unless --create).
fn open_check(store: &agentmount::cli::StoreArgs) -> Result<(), ExitCode> {
    store.check_exists().map_err(|e| {
        eprintln!("agentmount: {e}");
        ExitCode::from(1)
    })
}

fn fail(e: &agentmount::error::StoreError) -> ExitCode {
    eprintln!("agentmount: {e}");
    ExitCode::from(1)
}
