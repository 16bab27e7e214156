//! `kinesis`: streams, records, the KPL format and load generation from the command line. It reads
//! the AWS configuration as the AWS CLI does (profiles, `AWS_REGION`, `AWS_ENDPOINT_URL_KINESIS`,
//! `AWS_ENDPOINT_URL_DYNAMODB`, ...); `--local` runs the command on embedded emulators instead.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kinesis_cli::leases::{LeasesArgs, run_leases};
use kinesis_cli::loadgen::{Clients, LoadgenArgs, check, run_loadgen};
#[cfg(feature = "local")]
use kinesis_cli::local::Emulators;
use kinesis_cli::stream::{PutArgs, StreamCommand, run_put, run_stream};
use kinesis_cli::tail::{ShardForArgs, TailArgs, run_shard_for, run_tail};
use kinesis_cli::{agg, one_line};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Amazon Kinesis Data Streams from the command line.
#[derive(Parser)]
#[command(name = "kinesis", version)]
struct Cli {
    /// Run the command on embedded emulators (Kinesis and DynamoDB on 127.0.0.1, in this
    /// process), not on AWS. Their data lives as long as the command. Needs a build with the
    /// `local` feature (cargo install kinesis-cli --features local).
    #[arg(long, global = true)]
    local: bool,
    /// With --local: no per-shard write limits (by default the emulator enforces 1,000 records/s
    /// and 1 MiB/s per shard, as Kinesis does).
    #[arg(long, global = true)]
    no_throttle: bool,
    #[command(subcommand)]
    command: Command,
}

const PLACEHOLDERS: &str = "loadgen template placeholders: {{uuid}} {{firstname}} {{lastname}} {{name}} \
{{sentence}} {{int}} {{int:MIN:MAX}} {{float}} {{float:MIN:MAX}} {{seq}} {{producer}} {{timestamp}}";

#[derive(Subcommand)]
enum Command {
    /// Create, describe, list, split, merge and delete streams.
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Put a record (or one per line of stdin).
    Put(PutArgs),
    /// Print a stream's records, deaggregated, as JSON lines.
    Tail(TailArgs),
    /// The hash key of a partition key, and with --stream the open shard it lands on.
    ShardFor(ShardForArgs),
    /// A consumer application's leases (ours or the KCL's): owner, checkpoint, how far behind,
    /// handoffs, parents; and the leases per worker.
    Leases(LeasesArgs),
    /// Encode and decode KPL aggregated records (the same as `kinesis-agg`).
    #[command(subcommand)]
    Agg(agg::AggCommand),
    /// Put templated records from N producers, with a progress bar; --verify counts what a
    /// consumer group receives (sent, acknowledged, received, duplicates, lost).
    #[command(after_help = PLACEHOLDERS)]
    Loadgen(LoadgenArgs),
    /// Start the embedded emulators and serve them until Ctrl-C; prints the lines that point the
    /// AWS SDKs (and other `kinesis` commands) at them. Needs the `local` feature.
    Local,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<(), BoxError> = match cli.command {
        Command::Agg(command) => {
            let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
            let mut out = std::io::BufWriter::new(stdout.lock());
            let result = agg::run(command, &mut stdin.lock(), &mut out, &mut stderr.lock()).map_err(Into::into);
            let _ = out.flush();
            result
        }
        command => match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(run(command, cli.local, !cli.no_throttle)),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr().lock(), "kinesis: error: {}", one_line(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Without the `local` feature there are no emulators: no value of this type exists, and asking
/// for one says how to get them.
#[cfg(not(feature = "local"))]
enum Emulators {}

#[cfg(not(feature = "local"))]
impl Emulators {
    async fn start(_throttle: bool) -> Result<Self, BoxError> {
        Err("--local and `kinesis local` need the embedded emulators, which this build leaves out: \
             install with `cargo install kinesis-cli --features local` (or run from the repository \
             with `cargo run -p kinesis-cli --features local -- ...`)"
            .into())
    }
    fn clients(&self) -> Clients {
        match *self {}
    }
    fn exports(&self) -> String {
        match *self {}
    }
}

async fn run(command: Command, local: bool, throttle: bool) -> Result<(), BoxError> {
    // Keep the emulators alive until the command is done.
    let serve = matches!(command, Command::Local);
    let emulators = if local || serve {
        let emulators = Emulators::start(throttle).await?;
        eprintln!("embedded emulators{}", if throttle { " (per-shard write limits on)" } else { "" });
        if !serve {
            eprintln!("{}", emulators.exports().trim_end());
        }
        Some(emulators)
    } else {
        None
    };
    let clients = match &emulators {
        Some(emulators) => emulators.clients(),
        None => {
            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            Clients { kinesis: aws_sdk_kinesis::Client::new(&sdk), dynamodb: aws_sdk_dynamodb::Client::new(&sdk) }
        }
    };
    match command {
        Command::Loadgen(args) => {
            // Progress lines and the summary go to stdout line by line: no lock held across awaits.
            let page = args.report.clone();
            let report = run_loadgen(&clients, args, local).await?;
            let mut out = Vec::new();
            report.print(&mut out)?;
            if let Some(path) = page {
                report.write_html(&path)?;
                writeln!(out, "report        {}", path.display())?;
            }
            std::io::stdout().write_all(&out)?;
            check(&report)?;
            Ok(())
        }
        Command::Local => {
            if let Some(emulators) = &emulators {
                print!("{}", emulators.exports());
            }
            let _ = std::io::stdout().flush();
            eprintln!("serving until Ctrl-C");
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
        command => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let client = &clients.kinesis;
            let result = match command {
                Command::Stream(command) => run_stream(client, command, &mut out).await,
                Command::Put(args) => run_put(client, args, &mut std::io::stdin().lock(), &mut out).await,
                Command::Tail(args) => run_tail(client, args, &mut out).await,
                Command::ShardFor(args) => run_shard_for(client, args, &mut out).await,
                Command::Leases(args) => run_leases(client, &clients.dynamodb, args, &mut out).await,
                Command::Agg(_) | Command::Loadgen(_) | Command::Local => Ok(()),
            };
            out.flush()?;
            result.map_err(Into::into)
        }
    }
}
