use clap::Parser;
use crosskv::cli::{self, Cli, Command};

fn main() {
    let cli = Cli::parse();
    // The server logs its KV layout and start-up at info.
    let default_filter = match cli.command {
        Command::Serve(_) => "warn,crosskv=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CROSSKV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let result = match &cli.command {
        Command::Serve(a) => cli::serve(a),
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
