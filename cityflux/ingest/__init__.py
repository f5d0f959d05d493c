"""cityflux.ingest."""
