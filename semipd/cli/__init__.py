"""The `semipd` command line and the serving benchmark: the top layer, a client of everything below."""
