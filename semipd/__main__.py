"""`python -m semipd` is the `semipd` command."""
import sys

from semipd.cli.main import main

sys.exit(main())
