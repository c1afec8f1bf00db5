"""`python -m semipd` is the `semipd` command."""
import sys

from semipd.shared.runtime import die_with_parent

die_with_parent()  # `semipd serve --http`'s gateway dies with its server (a no-op for a user's command)

from semipd.cli.main import main  # noqa: E402 (after die_with_parent: the imports are slow)

sys.exit(main())
