package dev.kinesisrs.interop;

import com.fasterxml.jackson.databind.JsonNode;
import com.google.common.util.concurrent.FutureCallback;
import com.google.common.util.concurrent.Futures;
import com.google.common.util.concurrent.ListenableFuture;
import com.google.common.util.concurrent.MoreExecutors;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.URI;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Base64;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicReferenceArray;
import software.amazon.awssdk.auth.credentials.AwsBasicCredentials;
import software.amazon.awssdk.auth.credentials.StaticCredentialsProvider;
import software.amazon.kinesis.producer.Attempt;
import software.amazon.kinesis.producer.KinesisProducer;
import software.amazon.kinesis.producer.KinesisProducerConfiguration;
import software.amazon.kinesis.producer.UserRecord;
import software.amazon.kinesis.producer.UserRecordFailedException;
import software.amazon.kinesis.producer.UserRecordResult;

/**
 * Puts user records with the real KPL (its native daemon) and reports each result as a JSON line.
 *
 * <pre>
 * KplWriter --stream NAME [--aggregation true|false] [--max-buffered-ms 100] [--ttl-ms 30000]
 *           [--rate-limit 150] [--generate N --size 100 --keys 1000 --key-len 16] [--quiet true]
 *           [--max-user-record-bytes N] [--collection-max-bytes N]
 * </pre>
 *
 * The Kinesis endpoint comes from KPL_KINESIS_ENDPOINT, `host:port` of a TLS server (the KPL
 * talks nothing else; the certificate is not verified). Region: AWS_REGION or us-east-1.
 *
 * Without --generate, records are read from standard input, one JSON object per line:
 * {"partition_key": "...", "explicit_hash_key": "..." (optional), "data": "<base64>"}.
 * With it, N records of SIZE bytes are made here, keys drawn in turn from KEYS keys of KEY_LEN
 * characters (for benchmarks: no parsing in the measured run).
 *
 * Output, in input order once every record has a result (unless --quiet):
 * {"event":"result","index":i,"ok":true,"shard":"...","sequence":"...","aggregate_size":n,"attempts":k}
 * or {"event":"result","index":i,"ok":false,"attempts":k,"error":"code: message"}.
 * The KPL reports no sub-sequence number. Records that share a sequence number went out in one
 * aggregate; aggregate_size is how many did (1: the record went out alone). The order inside an
 * aggregate is not the put order (the daemon adds records from several threads).
 * The last line is {"event":"summary","records":N,"failed":F,"elapsed_ms":..}. Exit 0 iff F is 0.
 */
public final class KplWriter {
    private KplWriter() {}

    record Input(String partitionKey, String explicitHashKey, byte[] data) {}

    public static void main(String[] argv) throws Exception {
        Args args = new Args("KplWriter", argv);
        String stream = args.required("stream");
        String endpoint = Args.env("KPL_KINESIS_ENDPOINT");
        URI parsed = URI.create("tls://" + endpoint);
        boolean quiet = Boolean.parseBoolean(args.get("quiet", "false"));

        KinesisProducerConfiguration config = new KinesisProducerConfiguration()
                .setRegion(System.getenv().getOrDefault("AWS_REGION", "us-east-1"))
                .setKinesisEndpoint(parsed.getHost())
                .setKinesisPort(parsed.getPort())
                .setVerifyCertificate(false)
                .setMetricsLevel("none")
                .setLogLevel(args.get("log-level", "warning"))
                .setCredentialsProvider(StaticCredentialsProvider.create(AwsBasicCredentials.create("test", "test")))
                .setAggregationEnabled(Boolean.parseBoolean(args.get("aggregation", "true")))
                .setRecordMaxBufferedTime(args.getLong("max-buffered-ms", 100))
                .setRecordTtl(args.getLong("ttl-ms", 30_000))
                .setRateLimit(args.getLong("rate-limit", 150));
        // For streams whose MaxRecordSizeInKiB was raised (UpdateMaxRecordSize): the KPL's own
        // limits on a user record and on one PutRecords call.
        long maxUserRecord = args.getLong("max-user-record-bytes", -1);
        if (maxUserRecord > 0) {
            config.setMaxUserRecordSize(maxUserRecord);
        }
        long collectionMax = args.getLong("collection-max-bytes", -1);
        if (collectionMax > 0) {
            config.setCollectionMaxSize(collectionMax);
        }

        List<Input> inputs = new ArrayList<>();
        long generate = args.getLong("generate", -1);
        if (generate >= 0) {
            int size = (int) args.getLong("size", 100);
            int keyCount = (int) args.getLong("keys", 1000);
            int keyLen = (int) args.getLong("key-len", 16);
            String[] keys = new String[keyCount];
            for (int k = 0; k < keyCount; k++) {
                StringBuilder key = new StringBuilder(String.format("key-%d-", k));
                while (key.length() < keyLen) {
                    key.append('x');
                }
                keys[k] = key.substring(0, keyLen);
            }
            for (long i = 0; i < generate; i++) {
                byte[] data = new byte[size];
                byte[] id = Long.toString(i).getBytes(StandardCharsets.UTF_8);
                System.arraycopy(id, 0, data, 0, Math.min(id.length, size));
                inputs.add(new Input(keys[(int) (i % keyCount)], null, data));
            }
        } else {
            BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
            String text;
            while ((text = in.readLine()) != null) {
                if (text.isBlank()) {
                    continue;
                }
                JsonNode node = Out.json().readTree(text);
                JsonNode ehk = node.get("explicit_hash_key");
                inputs.add(new Input(node.get("partition_key").asText(),
                        ehk == null || ehk.isNull() ? null : ehk.asText(),
                        Base64.getDecoder().decode(node.get("data").asText())));
            }
        }

        int n = inputs.size();
        AtomicReferenceArray<Object> results = new AtomicReferenceArray<>(n);
        CountDownLatch done = new CountDownLatch(n);
        long maxOutstanding = args.getLong("max-outstanding", 100_000);
        long start = System.nanoTime();
        KinesisProducer producer = new KinesisProducer(config);
        for (int i = 0; i < n; i++) {
            while (producer.getOutstandingRecordsCount() > maxOutstanding) {
                Thread.sleep(1);
            }
            Input input = inputs.get(i);
            ListenableFuture<UserRecordResult> future = producer.addUserRecord(new UserRecord(stream,
                    input.partitionKey(), input.explicitHashKey(), ByteBuffer.wrap(input.data())));
            final int index = i;
            Futures.addCallback(future, new FutureCallback<>() {
                @Override
                public void onSuccess(UserRecordResult result) {
                    results.set(index, result);
                    done.countDown();
                }

                @Override
                public void onFailure(Throwable t) {
                    // A record that failed for good carries its attempts.
                    if (t instanceof UserRecordFailedException failed && failed.getResult() != null) {
                        results.set(index, failed.getResult());
                    } else {
                        results.set(index, t);
                    }
                    done.countDown();
                }
            }, MoreExecutors.directExecutor());
        }
        producer.flushSync();
        done.await();
        long elapsedMs = (System.nanoTime() - start) / 1_000_000;
        producer.destroy();

        // How many records went out in each aggregate.
        Map<String, Integer> perSequence = new HashMap<>();
        for (int i = 0; i < n; i++) {
            if (results.get(i) instanceof UserRecordResult r && r.isSuccessful()) {
                perSequence.merge(r.getShardId() + "/" + r.getSequenceNumber(), 1, Integer::sum);
            }
        }
        int failed = 0;
        for (int i = 0; i < n; i++) {
            Object o = results.get(i);
            Map<String, Object> m = Out.line("result");
            m.put("index", i);
            if (o instanceof UserRecordResult r && r.isSuccessful()) {
                String key = r.getShardId() + "/" + r.getSequenceNumber();
                m.put("ok", true);
                m.put("shard", r.getShardId());
                m.put("sequence", r.getSequenceNumber());
                m.put("aggregate_size", perSequence.get(key));
                m.put("attempts", r.getAttempts().size());
            } else {
                failed++;
                m.put("ok", false);
                if (o instanceof UserRecordResult r) {
                    m.put("attempts", r.getAttempts().size());
                    Attempt lastAttempt = r.getAttempts().isEmpty() ? null : r.getAttempts().get(r.getAttempts().size() - 1);
                    m.put("error", lastAttempt == null ? "no attempt" : lastAttempt.getErrorCode() + ": " + lastAttempt.getErrorMessage());
                } else {
                    m.put("error", String.valueOf(o));
                }
            }
            if (!quiet || !Boolean.TRUE.equals(m.get("ok"))) {
                Out.emitBuffered(m);
            }
        }
        Map<String, Object> summary = Out.line("summary");
        summary.put("records", n);
        summary.put("failed", failed);
        summary.put("elapsed_ms", elapsedMs);
        Out.emitBuffered(summary);
        Out.flush();
        System.exit(failed == 0 ? 0 : 1);
    }
}
