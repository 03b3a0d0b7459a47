//! `ferry`: one binary, several roles (see `ferry --help`).
mod api;
mod cli;
mod cluster;
mod demo;
mod demo_cluster;
mod demo_overlay;
mod run;

use clap::{CommandFactory, Parser};

fn main() {
    let cli = cli::Cli::parse();
    if let cli::Command::Run(a) = &cli.command {
        let problem = if a.guest.is_none() && a.kernel.is_none() && a.api_socket.is_none() {
            Some("one of --guest or --kernel is required (or --api-socket alone: an empty VMM that waits for PUT /vm/restore)")
        } else if a.kernel.is_none() && a.initrd.is_some() {
            Some("--initrd requires --kernel")
        } else if a.kernel.is_none() && a.cmdline.is_some() {
            Some("--cmdline requires --kernel (the test guest takes its workload in --guest)")
        } else {
            None
        };
        if let Some(msg) = problem {
            let mut cmd = cli::Cli::command();
            let run = cmd
                .find_subcommand_mut("run")
                .map(|c| c.clone())
                .unwrap_or_default();
            run.clone()
                .error(clap::error::ErrorKind::MissingRequiredArgument, msg)
                .exit();
        }
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if matches!(
        cli.command,
        cli::Command::Vm(_)
            | cli::Command::Snapshot(_)
            | cli::Command::Seed(_)
            | cli::Command::Migrate(_)
            | cli::Command::Disk(_)
            | cli::Command::Cluster(_)
    ) {
        // Client commands end quietly when their output pipe closes (`ferry migrate | head`),
        // as Unix tools do. VMM commands keep ignoring SIGPIPE: a console reader going away
        // must not take the guest with it.
        // SAFETY: restoring the default disposition of one signal before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match cli.command {
        cli::Command::Run(args) => run::main(args),
        cli::Command::Vm(args) => api::client::main(args).map(|()| 0),
        cli::Command::Demo(args) => demo::main(args).map(|()| 0),
        cli::Command::Snapshot(args) => api::client::snapshot(args).map(|()| 0),
        cli::Command::Seed(args) => api::client::seed(args).map(|()| 0),
        cli::Command::Migrate(args) => api::client::migrate(args).map(|()| 0),
        cli::Command::Disk(args) => api::disk_client::main(args).map(|()| 0),
        cli::Command::Restore(args) => run::restore(args),
        cli::Command::Receive(args) => run::receive(args),
        cli::Command::Host(args) => cluster::host::main(args),
        cli::Command::Cluster(args) => cluster::client::main(args).map(|()| 0),
        cli::Command::Certs(args) => run::certs(args).map(|()| 0),
        cli::Command::GuestImage { output } => std::fs::write(&output, ferry_guest::IMAGE)
            .map(|()| 0)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", output.display())),
    };
    let c = match code {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            run::EXIT_ERROR
        }
    };
    // A host agent learns how a VMM it adopted (not its child) ended from this file.
    if let Some(f) = std::env::var_os(cluster::runner::EXIT_FILE_ENV) {
        let _ = std::fs::write(f, c.to_string());
    }
    std::process::exit(c)
}
