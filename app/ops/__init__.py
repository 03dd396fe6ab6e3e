"""Operations: the command line (serve, keys, check, backup, restore), diagnostics, workers
and TLS."""
