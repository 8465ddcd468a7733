"""Operating it: metrics, logs, health and readiness, the OpenAPI description, and GC tuning."""
