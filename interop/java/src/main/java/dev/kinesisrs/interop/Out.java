package dev.kinesisrs.interop;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedOutputStream;
import java.io.FileOutputStream;
import java.io.FileDescriptor;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;

/** One JSON object per line on standard output, whole lines only, from any thread. */
final class Out {
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final PrintStream STDOUT =
            new PrintStream(new BufferedOutputStream(new FileOutputStream(FileDescriptor.out), 1 << 16), false, StandardCharsets.UTF_8);

    private Out() {}

    /** A map that keeps the order of its keys, for readable lines. */
    static Map<String, Object> line(String event) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("event", event);
        m.put("t_ms", System.currentTimeMillis());
        return m;
    }

    static void emit(Map<String, Object> fields) {
        String text = text(fields);
        synchronized (STDOUT) {
            STDOUT.println(text);
            STDOUT.flush();
        }
    }

    /** For many lines in a row: written without a flush per line; call {@link #flush()} after. */
    static void emitBuffered(Map<String, Object> fields) {
        String text = text(fields);
        synchronized (STDOUT) {
            STDOUT.println(text);
        }
    }

    private static String text(Map<String, Object> fields) {
        try {
            return JSON.writeValueAsString(fields);
        } catch (Exception e) {
            throw new IllegalStateException("cannot write a JSON line", e);
        }
    }

    static void flush() {
        synchronized (STDOUT) {
            STDOUT.flush();
        }
    }

    static ObjectMapper json() {
        return JSON;
    }
}
