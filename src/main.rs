use clap::Parser;
use crosskv::cli::{self, Cli, Command};

fn main() {
    // Our ops parallelise on rayon; candle's own barrier pool would add a second set of
    // spinning workers on the same cores, so candle's ops run on the calling thread.
    if !crosskv::env::CANDLE_NUM_THREADS.is_set() {
        crosskv::env::CANDLE_NUM_THREADS.set("1");
    }
    let cli = Cli::parse();
    // The server logs its KV layout and start-up at info.
    let default_filter = match cli.command {
        Command::Serve(_) => "warn,crosskv=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(crosskv::env::LOG.name)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let result = match &cli.command {
        Command::Serve(a) => cli::serve(a),
        Command::Generate(a) => cli::generate(a),
        Command::Capacity(a) => cli::capacity(a),
        Command::Convert(a) => cli::convert(a),
        Command::Bench(a) => cli::bench(a),
        Command::Eval(a) => cli::eval(a),
        Command::Train(a) => cli::train(a),
        Command::Finetune(a) => cli::finetune(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
