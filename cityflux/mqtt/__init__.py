"""cityflux.mqtt: the MQTT wire protocol, the consumer the pipeline reads from, and the bulk
publisher the simulators write with."""
