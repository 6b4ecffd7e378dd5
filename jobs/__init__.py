"""jobs: entry points (each a `main(argv)`), runnable as `python -m jobs.<name>` and via `seedpipe`."""
