"""cityflux.model: the lowest layer, the types every stage shares.

Readings as columns and rejections (columns), the device contract as data (contract), the city
map (citymap) and time units (units). It imports nothing from other cityflux packages except
cityflux.errors, so every layer above may use it.
"""
