"""``python -m hf_align.cli``: the ``hf-align`` command."""

import sys

from . import main

sys.exit(main())
