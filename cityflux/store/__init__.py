"""cityflux.store."""
