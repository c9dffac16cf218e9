"""MLflow models-from-code entry point of the registered pyfunc.

MLflow runs this file, not an import of it, when it logs or loads a streamrank model, and
takes the object passed to ``set_model`` as the model. Logging the model as code rather
than as a cloudpickle of a ``StreamRankPyfunc`` means loading it never unpickles anything
(MLflow warns that it will stop doing so by default: ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``),
and the class is found by name in the code that travels with the model (``code_paths``).
Nothing in streamrank imports this module.
"""

from mlflow.models import set_model

from streamrank.pyfunc_model import StreamRankPyfunc

set_model(StreamRankPyfunc())
