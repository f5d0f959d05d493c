"""cityflux.pipeline: wires source -> ingest -> analytics -> store; owns threads and supervision."""
