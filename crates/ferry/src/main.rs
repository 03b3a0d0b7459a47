//! `ferry`: one binary, several roles (see `ferry --help`).
mod api;
mod cli;
mod demo;
mod run;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let code = match cli.command {
        cli::Command::Run(args) => run::main(args),
        cli::Command::Vm(args) => api::client::main(args).map(|()| 0),
        cli::Command::Demo(args) => demo::main(args).map(|()| 0),
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            std::process::exit(run::EXIT_ERROR);
        }
    }
}
