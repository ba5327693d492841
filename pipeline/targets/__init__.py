"""The targets store: a Zarr v3 group of teacher outputs indexed [row, position, ...]."""
