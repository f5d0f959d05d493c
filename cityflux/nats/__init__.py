"""NATS JetStream: the partitioned source, its set-up, and the shared state of a city's workers
(docs/scale.md)."""
