//! `kinesis-agg`: encode and decode KPL aggregated records. See `kinesis_cli::agg`.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use kinesis_cli::{agg, one_line};

/// Encode and decode KPL aggregated records (the Kinesis Producer Library's record format).
#[derive(Parser)]
#[command(name = "kinesis-agg", version)]
struct Cli {
    #[command(subcommand)]
    command: agg::AggCommand,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let mut out = std::io::BufWriter::new(stdout.lock());
    match agg::run(cli.command, &mut stdin.lock(), &mut out, &mut stderr.lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            drop(out);
            let _ = writeln!(stderr.lock(), "kinesis-agg: error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}
