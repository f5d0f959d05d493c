"""cityflux.dashboards."""
