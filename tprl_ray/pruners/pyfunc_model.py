"""The models-from-code file MLflow logs for a pruner: it builds :class:`PrunerModel` on load (no pickle)."""

from mlflow.models import set_model

from tprl_ray.pruners.pyfunc import PrunerModel

set_model(PrunerModel())
