"""Files on disk: atomic writes and directories, output-path and disk-space checks made before work starts."""
