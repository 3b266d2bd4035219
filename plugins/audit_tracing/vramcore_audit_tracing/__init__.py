"""OpenTelemetry traces, metrics and log narration for vramcore."""
