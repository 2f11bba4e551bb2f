"""Tolerance metrics of trained BNNs (Buschjäger et al.): neuron-level margin and
inter-neuron importance variance, plus the analytic flip probability of a neuron's output.

>>> from bnn_tol import metrics
>>> m = metrics.margin(model, test)              # doctest: +SKIP
>>> metrics.margin_summary(m)                    # doctest: +SKIP
>>> imp = metrics.importance(model, test)        # doctest: +SKIP
>>> metrics.importance_variance(imp)             # doctest: +SKIP
>>> metrics.estimators.names()                   # doctest: +SKIP
['accuracy', 'loss', 'flips', 'taylor', 'mc', 'loss_norm']
>>> metrics.flip_probability(model, test, ber=0.05)  # doctest: +SKIP
>>> metrics.predict_accuracy(model, test, [0.01, 0.1])  # doctest: +SKIP
"""

from bnn_tol.metrics import estimators
from bnn_tol.metrics.flipprob import flip_probability, flip_tables
from bnn_tol.metrics.importance import (
    importance,
    importance_variance,
    negation_logits,
    required_samples,
)
from bnn_tol.metrics.margin import (
    MARGIN_COLUMNS,
    margin,
    margin_positions,
    margin_summary,
    score_margin,
)
from bnn_tol.metrics.predict import predict_accuracy

__all__ = ["margin", "margin_summary", "margin_positions", "score_margin", "MARGIN_COLUMNS",
           "importance", "importance_variance", "required_samples", "negation_logits",
           "estimators", "flip_probability", "flip_tables", "predict_accuracy"]
