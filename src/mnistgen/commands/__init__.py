"""The `mnistgen` subcommands, one module each: argument parsing and output around the library (mnistgen.cli lists them)."""
