//! The two-phase checkpoint (the KCL's `prepareCheckpoint`): a prepared checkpoint is the
//! lease's `pendingCheckpoint` until it is committed; a worker that takes the lease over in
//! between resumes after the committed checkpoint and learns of the pending one in `initialize`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{bed_and_stream, config, eventually, put_plain};
use kinesis_consumer::{Batch, Checkpoint, Checkpointer, Initialization, LeaseTable, Position, Processor, Scheduler};

#[derive(Clone, Default)]
struct Seen {
    initialized: Arc<Mutex<Vec<Initialization>>>,
    records: Arc<Mutex<Vec<String>>>,
}

/// Commits the first batch; prepares (and commits only if `commit`) every later one.
struct TwoPhase {
    seen: Seen,
    commit: bool,
    batches: usize,
}

impl Processor for TwoPhase {
    async fn initialize(&mut self, init: &Initialization) {
        self.seen.initialized.lock().unwrap().push(init.clone());
    }

    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        self.seen
            .records
            .lock()
            .unwrap()
            .extend(batch.records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()));
        self.batches += 1;
        if self.batches == 1 {
            checkpointer.checkpoint().await.unwrap();
            return;
        }
        let prepared = checkpointer.prepare_checkpoint().await.expect("prepare");
        let last = batch.records.last().unwrap();
        assert_eq!(
            prepared.pending(),
            &Checkpoint { position: Position::Sequence(last.sequence_number.to_string()), sub_sequence: 0 }
        );
        if self.commit {
            prepared.commit().await.expect("commit");
        }
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

fn start(
    bed: &kinesis_testkit::TestBed,
    stream: &str,
    app: &str,
    worker: &str,
    seen: &Seen,
    commit: bool,
) -> Scheduler {
    let seen = seen.clone();
    Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config(stream, app, worker), move |_: &str| {
        TwoPhase { seen: seen.clone(), commit, batches: 0 }
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_checkpoint_is_pending_until_committed_and_a_new_owner_learns_of_it() {
    let (bed, stream, app) = bed_and_stream(1).await;
    let leases = LeaseTable::new(bed.dynamodb.client(), &app);
    let first = Seen::default();
    let a = start(&bed, &stream, &app, "a", &first, false);
    put_plain(&bed.kinesis.client(), &stream, "one", 5).await;
    assert!(eventually(Duration::from_secs(20), || first.records.lock().unwrap().len() == 5).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    put_plain(&bed.kinesis.client(), &stream, "two", 5).await;
    assert!(eventually(Duration::from_secs(20), || first.records.lock().unwrap().len() == 10).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let row = leases.list().await.unwrap().remove(0);
    let pending = row.pending_checkpoint.clone().expect("the second batch is prepared");
    assert_ne!(Some(&row.checkpoint), Some(&pending), "and not committed");
    a.abort();

    // The next owner resumes after the committed checkpoint and is told of the pending one.
    let second = Seen::default();
    let b = start(&bed, &stream, &app, "b", &second, true);
    assert!(eventually(Duration::from_secs(30), || second.records.lock().unwrap().len() == 5).await);
    let init = second.initialized.lock().unwrap()[0].clone();
    assert_eq!(init.checkpoint, row.checkpoint);
    assert_eq!(init.pending_checkpoint, Some(pending.clone()));
    assert!(second.records.lock().unwrap().iter().all(|r| r.starts_with("two-")), "the prepared batch again");
    // Its own prepare-and-commit makes the checkpoint and clears the pending one.
    put_plain(&bed.kinesis.client(), &stream, "three", 5).await;
    assert!(eventually(Duration::from_secs(20), || second.records.lock().unwrap().len() == 10).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = leases.list().await.unwrap().remove(0);
        if now.pending_checkpoint.is_none() && now.checkpoint != row.checkpoint && now.checkpoint != pending {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "committed: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.shutdown().await.unwrap();
}
