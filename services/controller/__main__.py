"""`python -m services.controller` is `semipd serve`."""
import sys

from shared.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
