package dev.kinesisrs.interop;

import java.util.HashMap;
import java.util.Map;

/** `--name value` pairs; every option must have a value. */
final class Args {
    private final Map<String, String> values = new HashMap<>();
    private final String program;

    Args(String program, String[] argv) {
        this.program = program;
        for (int i = 0; i < argv.length; i++) {
            String a = argv[i];
            if (!a.startsWith("--") || i + 1 >= argv.length) {
                throw usage("expected --name value, got " + a);
            }
            values.put(a.substring(2), argv[++i]);
        }
    }

    String required(String name) {
        String v = values.get(name);
        if (v == null) {
            throw usage("--" + name + " is required");
        }
        return v;
    }

    String get(String name, String fallback) {
        return values.getOrDefault(name, fallback);
    }

    long getLong(String name, long fallback) {
        String v = values.get(name);
        return v == null ? fallback : Long.parseLong(v);
    }

    IllegalArgumentException usage(String why) {
        return new IllegalArgumentException(program + ": " + why);
    }

    /** An endpoint from the environment, as the AWS SDKs name it. */
    static String env(String name) {
        String v = System.getenv(name);
        if (v == null || v.isEmpty()) {
            throw new IllegalArgumentException(name + " is not set: point it at the emulator");
        }
        return v;
    }
}
