"""``python -m resp_core.cli``: the same as ``respctl``."""

from . import main

main()
