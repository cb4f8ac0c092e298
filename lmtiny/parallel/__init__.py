"""Devices and meshes: the named mesh and the one table of logical-axis sharding rules, multi-host start-up, XLA options."""
