use clap::Parser;
use crosskv::cli::{self, Cli, Command};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CROSSKV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => cli::generate(a),
        Command::Capacity(a) => cli::capacity(a),
        Command::Convert(a) => cli::convert(a),
        Command::Bench(a) => cli::bench(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
