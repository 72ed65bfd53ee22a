"""The `cilia` command line."""
