//! `kinesis`: streams, records and the KPL format from the command line. It reads the AWS
//! configuration as the AWS CLI does (profiles, `AWS_REGION`, `AWS_ENDPOINT_URL_KINESIS`, ...).

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kinesis_cli::stream::{PutArgs, StreamCommand, TailArgs, run_put, run_stream, run_tail};
use kinesis_cli::{agg, one_line};

/// Amazon Kinesis Data Streams from the command line.
#[derive(Parser)]
#[command(name = "kinesis", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, describe, list, split, merge and delete streams.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Put a record (or one per line of stdin).
    Put(PutArgs),
    /// Print a stream's records, deaggregated, as JSON lines.
    Tail(TailArgs),
    /// Encode and decode KPL aggregated records (the same as `kinesis-agg`).
    #[command(subcommand)]
    Agg(agg::AggCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Agg(command) => {
            let (stdin, stderr) = (std::io::stdin(), std::io::stderr());
            agg::run(command, &mut stdin.lock(), &mut out, &mut stderr.lock()).map_err(Into::into)
        }
        command => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(async {
                let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                let client = aws_sdk_kinesis::Client::new(&sdk);
                match command {
                    Command::Stream(command) => run_stream(&client, command, &mut out).await,
                    Command::Put(args) => run_put(&client, args, &mut std::io::stdin().lock(), &mut out).await,
                    Command::Tail(args) => run_tail(&client, args, &mut out).await,
                    Command::Agg(_) => Ok(()),
                }
                .map_err(Into::into)
            }),
            Err(e) => Err(e.into()),
        },
    };
    let _ = out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            drop(out);
            let _ = writeln!(std::io::stderr().lock(), "kinesis: error: {}", one_line(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}
