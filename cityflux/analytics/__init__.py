"""cityflux.analytics."""
