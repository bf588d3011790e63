"""The `recsys` command line: wires arguments to library functions, nothing more."""
