"""``python -m tiers`` is the ``tiers`` command."""

from tiers.cli.main import main

main()
