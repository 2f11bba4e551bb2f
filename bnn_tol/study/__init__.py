"""Studies: the study runner, analysis, report and plots."""

from bnn_tol.study.runner import *  # noqa: F403
from bnn_tol.study.runner import __all__  # noqa: F401
