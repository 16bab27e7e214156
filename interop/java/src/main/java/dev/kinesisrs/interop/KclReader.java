package dev.kinesisrs.interop;

import java.net.URI;
import java.nio.ByteBuffer;
import java.security.MessageDigest;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import software.amazon.awssdk.auth.credentials.AwsBasicCredentials;
import software.amazon.awssdk.auth.credentials.StaticCredentialsProvider;
import software.amazon.awssdk.http.SdkHttpConfigurationOption;
import software.amazon.awssdk.http.async.SdkAsyncHttpClient;
import software.amazon.awssdk.http.nio.netty.NettyNioAsyncHttpClient;
import software.amazon.awssdk.regions.Region;
import software.amazon.awssdk.services.cloudwatch.CloudWatchAsyncClient;
import software.amazon.awssdk.services.dynamodb.DynamoDbAsyncClient;
import software.amazon.awssdk.services.kinesis.KinesisAsyncClient;
import software.amazon.awssdk.utils.AttributeMap;
import software.amazon.kinesis.common.ConfigsBuilder;
import software.amazon.kinesis.common.InitialPositionInStream;
import software.amazon.kinesis.common.InitialPositionInStreamExtended;
import software.amazon.kinesis.common.StreamConfig;
import software.amazon.kinesis.common.StreamIdentifier;
import software.amazon.kinesis.coordinator.CoordinatorConfig;
import software.amazon.kinesis.coordinator.Scheduler;
import software.amazon.kinesis.leases.LeaseManagementConfig;
import software.amazon.kinesis.lifecycle.events.InitializationInput;
import software.amazon.kinesis.lifecycle.events.LeaseLostInput;
import software.amazon.kinesis.lifecycle.events.ProcessRecordsInput;
import software.amazon.kinesis.lifecycle.events.ShardEndedInput;
import software.amazon.kinesis.lifecycle.events.ShutdownRequestedInput;
import software.amazon.kinesis.metrics.NullMetricsFactory;
import software.amazon.kinesis.processor.FormerStreamsLeasesDeletionStrategy;
import software.amazon.kinesis.processor.MultiStreamTracker;
import software.amazon.kinesis.processor.RecordProcessorCheckpointer;
import software.amazon.kinesis.processor.ShardRecordProcessor;
import software.amazon.kinesis.processor.ShardRecordProcessorFactory;
import software.amazon.kinesis.processor.SingleStreamTracker;
import software.amazon.kinesis.processor.StreamTracker;
import software.amazon.kinesis.retrieval.KinesisClientRecord;
import software.amazon.kinesis.retrieval.polling.PollingConfig;

/**
 * A KCL 3.x application that reports every user record it processes as a JSON line and
 * checkpoints after every batch.
 *
 * <pre>
 * KclReader (--stream NAME | --streams ACCOUNT:NAME:EPOCH,...) --app APPLICATION [--worker ID] [--position TRIM_HORIZON|LATEST]
 *           [--failover-ms 10000] [--shard-sync-ms FAILOVER] [--mode 3x|2x] [--idle-ms 200] [--max-records 10000]
 *           [--checkpoint batch|never] [--stop-after N] [--report records|batches]
 * </pre>
 *
 * Endpoints come from AWS_ENDPOINT_URL_KINESIS and AWS_ENDPOINT_URL_DYNAMODB (http or https, any
 * certificate), the region from AWS_REGION (us-east-1 when unset); credentials are test/test.
 * `--streams` runs the KCL in multi-stream mode (a MultiStreamTracker of those stream identifiers,
 * each at --position, leases of former streams kept); each line then names its "stream".
 * `--mode 2x` runs the KCL with CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X (the 2.x lease taker and
 * stealer); `3x` is the KCL 3.x default (leader-based lease assignment).
 *
 * Lines (each has "event" and "t_ms", the wall clock in epoch milliseconds):
 * started, initialized (shard, sequence, sub_sequence: where the shard is resumed from),
 * record (worker, shard, sequence, sub_sequence, aggregated, partition_key, explicit_hash_key,
 * data_len, data_sha256), checkpointed (shard, sequence, sub_sequence), checkpoint_failed
 * (shard, error), lease_lost, shard_ended, shutdown_requested, stopped.
 * With --report batches (for benchmarks), a batch line (shard, count) replaces the record lines.
 * On SIGTERM it shuts down gracefully (every processor checkpoints after the last record it
 * reported), prints "stopped" and exits (143, as the JVM does after SIGTERM). With --stop-after N, a processor reports and
 * checkpoints its first N records (the checkpoint at the Nth, by sequence and sub-sequence, so
 * possibly inside an aggregate), then ignores the rest of its shard.
 */
public final class KclReader {
    private KclReader() {}

    public static void main(String[] argv) throws Exception {
        Args args = new Args("KclReader", argv);
        String multi = args.get("streams", "");
        String stream = multi.isEmpty() ? args.required("stream") : null;
        String app = args.required("app");
        String worker = args.get("worker", UUID.randomUUID().toString());
        InitialPositionInStream position = InitialPositionInStream.valueOf(args.get("position", "TRIM_HORIZON"));
        long failoverMs = args.getLong("failover-ms", 10_000);
        long shardSyncMs = args.getLong("shard-sync-ms", Math.max(1_000, failoverMs));
        String mode = args.get("mode", "3x");
        long idleMs = args.getLong("idle-ms", 200);
        int maxRecords = (int) args.getLong("max-records", 10_000);
        boolean checkpoint = args.get("checkpoint", "batch").equals("batch");
        long stopAfter = args.getLong("stop-after", Long.MAX_VALUE);
        boolean perRecord = args.get("report", "records").equals("records");

        Region region = Region.of(System.getenv().getOrDefault("AWS_REGION", "us-east-1"));
        StaticCredentialsProvider credentials =
                StaticCredentialsProvider.create(AwsBasicCredentials.create("test", "test"));
        // HTTP/1.1 (the Netty default): KinesisClientUtil would force HTTP/2, which an emulator
        // on plain http cannot speak. Self-signed certificates are accepted.
        SdkAsyncHttpClient http = NettyNioAsyncHttpClient.builder()
                .maxConcurrency(200)
                .buildWithDefaults(AttributeMap.builder()
                        .put(SdkHttpConfigurationOption.TRUST_ALL_CERTIFICATES, true)
                        .build());
        URI kinesisEndpoint = URI.create(Args.env("AWS_ENDPOINT_URL_KINESIS"));
        URI dynamoEndpoint = URI.create(Args.env("AWS_ENDPOINT_URL_DYNAMODB"));
        KinesisAsyncClient kinesis = KinesisAsyncClient.builder().region(region).credentialsProvider(credentials)
                .httpClient(http).endpointOverride(kinesisEndpoint).build();
        DynamoDbAsyncClient dynamo = DynamoDbAsyncClient.builder().region(region).credentialsProvider(credentials)
                .httpClient(http).endpointOverride(dynamoEndpoint).build();
        // Required by ConfigsBuilder; never called, since metrics go to NullMetricsFactory.
        CloudWatchAsyncClient cloudWatch = CloudWatchAsyncClient.builder().region(region)
                .credentialsProvider(credentials).httpClient(http).endpointOverride(dynamoEndpoint).build();

        InitialPositionInStreamExtended initial = InitialPositionInStreamExtended.newInitialPosition(position);
        StreamTracker tracker;
        if (stream != null) {
            tracker = new SingleStreamTracker(StreamIdentifier.singleStreamInstance(stream), initial);
        } else {
            List<StreamConfig> streams = new ArrayList<>();
            for (String id : multi.split(",")) {
                streams.add(new StreamConfig(StreamIdentifier.multiStreamInstance(id), initial));
            }
            tracker = new MultiStreamTracker() {
                @Override
                public List<StreamConfig> streamConfigList() {
                    return streams;
                }

                @Override
                public FormerStreamsLeasesDeletionStrategy formerStreamsLeasesDeletionStrategy() {
                    return new FormerStreamsLeasesDeletionStrategy.NoLeaseDeletionStrategy();
                }
            };
        }
        ShardRecordProcessorFactory factory = new ShardRecordProcessorFactory() {
            @Override
            public ShardRecordProcessor shardRecordProcessor() {
                return new Processor(worker, stream, checkpoint, stopAfter, perRecord);
            }

            @Override
            public ShardRecordProcessor shardRecordProcessor(StreamIdentifier id) {
                return new Processor(worker, id.streamName(), checkpoint, stopAfter, perRecord);
            }
        };
        ConfigsBuilder configs = new ConfigsBuilder(tracker, app, kinesis, dynamo, cloudWatch, worker, factory);

        LeaseManagementConfig lease = configs.leaseManagementConfig()
                .failoverTimeMillis(failoverMs)
                .shardSyncIntervalMillis(shardSyncMs);
        // No EC2 metadata probe off AWS; the worker still publishes its WorkerMetricStats row.
        lease.workerUtilizationAwareAssignmentConfig().disableWorkerMetrics(true);
        CoordinatorConfig coordinator = configs.coordinatorConfig();
        switch (mode) {
            case "2x" -> coordinator.clientVersionConfig(
                    CoordinatorConfig.ClientVersionConfig.CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X);
            case "3x" -> coordinator.clientVersionConfig(CoordinatorConfig.ClientVersionConfig.CLIENT_VERSION_CONFIG_3X);
            default -> throw args.usage("--mode is 3x or 2x, not " + mode);
        }
        PollingConfig polling = (stream != null ? new PollingConfig(stream, kinesis) : new PollingConfig(kinesis))
                .idleTimeBetweenReadsInMillis(idleMs)
                .maxRecords(maxRecords);

        Scheduler scheduler = new Scheduler(configs.checkpointConfig(), coordinator, lease, configs.lifecycleConfig(),
                configs.metricsConfig().metricsFactory(new NullMetricsFactory()), configs.processorConfig(),
                configs.retrievalConfig().retrievalSpecificConfig(polling));

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                boolean clean = scheduler.startGracefulShutdown().get(60, TimeUnit.SECONDS);
                Map<String, Object> line = Out.line("stopped");
                line.put("worker", worker);
                line.put("clean", clean);
                Out.emit(line);
            } catch (Exception e) {
                Map<String, Object> line = Out.line("stopped");
                line.put("worker", worker);
                line.put("clean", false);
                line.put("error", e.toString());
                Out.emit(line);
            } finally {
                stopped.countDown();
            }
        }, "graceful-shutdown"));

        Map<String, Object> started = Out.line("started");
        started.put("worker", worker);
        started.put("mode", mode);
        Out.emit(started);
        Thread run = new Thread(scheduler, "scheduler");
        run.start();
        run.join();
        stopped.await(Duration.ofSeconds(90).toMillis(), TimeUnit.MILLISECONDS);
    }

    /** One per shard lease, as the KCL creates them. */
    static final class Processor implements ShardRecordProcessor {
        private final String worker;
        private final String stream;
        private final boolean checkpoint;
        private final long stopAfter;
        private final boolean perRecord;
        private long reported;
        private KinesisClientRecord lastReported;
        private String shard = "?";

        Processor(String worker, String stream, boolean checkpoint, long stopAfter, boolean perRecord) {
            this.worker = worker;
            this.stream = stream;
            this.perRecord = perRecord;
            this.checkpoint = checkpoint;
            this.stopAfter = stopAfter;
        }

        private Map<String, Object> line(String event) {
            Map<String, Object> m = Out.line(event);
            m.put("worker", worker);
            m.put("shard", shard);
            if (stream != null) {
                m.put("stream", stream);
            }
            return m;
        }

        @Override
        public void initialize(InitializationInput input) {
            shard = input.shardId();
            Map<String, Object> m = line("initialized");
            m.put("sequence", input.extendedSequenceNumber().sequenceNumber());
            m.put("sub_sequence", input.extendedSequenceNumber().subSequenceNumber());
            Out.emit(m);
        }

        @Override
        public void processRecords(ProcessRecordsInput input) {
            if (!perRecord) {
                Map<String, Object> m = line("batch");
                m.put("count", input.records().size());
                Out.emit(m);
                List<KinesisClientRecord> records = input.records();
                if (checkpoint && !records.isEmpty()) {
                    checkpointAt(input.checkpointer(), records.get(records.size() - 1));
                }
                return;
            }
            MessageDigest sha;
            try {
                sha = MessageDigest.getInstance("SHA-256");
            } catch (Exception e) {
                throw new IllegalStateException(e);
            }
            KinesisClientRecord last = null;
            for (KinesisClientRecord r : input.records()) {
                if (reported >= stopAfter) {
                    break;
                }
                reported++;
                ByteBuffer data = r.data().duplicate();
                byte[] bytes = new byte[data.remaining()];
                data.get(bytes);
                Map<String, Object> m = line("record");
                m.put("sequence", r.sequenceNumber());
                m.put("sub_sequence", r.subSequenceNumber());
                m.put("aggregated", r.aggregated());
                m.put("partition_key", r.partitionKey());
                m.put("explicit_hash_key", r.explicitHashKey());
                m.put("data_len", bytes.length);
                m.put("data_sha256", HexFormat.of().formatHex(sha.digest(bytes)));
                Out.emitBuffered(m);
                last = r;
                lastReported = r;
            }
            Out.flush();
            if (checkpoint && last != null) {
                checkpointAt(input.checkpointer(), last);
            }
        }

        private void checkpointAt(RecordProcessorCheckpointer checkpointer, KinesisClientRecord last) {
            try {
                checkpointer.checkpoint(last.sequenceNumber(), last.subSequenceNumber());
                Map<String, Object> m = line("checkpointed");
                m.put("sequence", last.sequenceNumber());
                m.put("sub_sequence", last.subSequenceNumber());
                Out.emit(m);
            } catch (Exception e) {
                checkpointFailed(e);
            }
        }

        private void checkpointFailed(Exception e) {
            Map<String, Object> m = line("checkpoint_failed");
            m.put("error", e.toString());
            Out.emit(m);
        }

        @Override
        public void leaseLost(LeaseLostInput input) {
            Out.emit(line("lease_lost"));
        }

        @Override
        public void shardEnded(ShardEndedInput input) {
            if (reported >= stopAfter) {
                return; // records were left unprocessed: no SHARD_END
            }
            try {
                input.checkpointer().checkpoint();
                Out.emit(line("shard_ended"));
            } catch (Exception e) {
                checkpointFailed(e);
            }
        }

        @Override
        public void shutdownRequested(ShutdownRequestedInput input) {
            try {
                if (checkpoint && lastReported != null) {
                    input.checkpointer().checkpoint(lastReported.sequenceNumber(), lastReported.subSequenceNumber());
                }
                Out.emit(line("shutdown_requested"));
            } catch (Exception e) {
                checkpointFailed(e);
            }
        }
    }
}
