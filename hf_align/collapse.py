"""Neural-collapse metrics (NC1-NC4, GNC2, GNC3, Tammes): moved to :mod:`hf_align.analysis.collapse`.

This module re-exports its public names so that ``from hf_align.collapse import ...`` keeps working.
"""

from .analysis.collapse import *  # noqa: F401,F403
from .analysis.collapse import __all__  # noqa: F401
