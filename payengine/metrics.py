"""``payengine.metrics``: Prometheus metrics of an engine (extra ``payengine[metrics]``).

    from payengine.metrics import EngineMetrics
    metrics = EngineMetrics(engine)       # ExtraMissing without prometheus-client
    print(metrics.text())                 # the Prometheus text format

See ``payengine.actors.metrics`` and README "Metrics".
"""

from payengine.actors.metrics import OWED_COUNT_MAX, EngineMetrics
from payengine.actors.observe import NO_OBSERVER, Observer, Vitals
from payengine.engine.errors import ExtraMissing

__all__ = ["NO_OBSERVER", "OWED_COUNT_MAX", "EngineMetrics", "ExtraMissing", "Observer", "Vitals"]
