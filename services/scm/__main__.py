"""`python -m services.scm` is `semipd scm`."""
import sys

from shared.cli import main

sys.exit(main(["scm", *sys.argv[1:]]))
