"""cityflux.simulators."""
