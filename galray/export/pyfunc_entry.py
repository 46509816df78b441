"""The file MLflow runs when it loads a galray model ("models from code"): nothing is unpickled."""

from mlflow.models import set_model

from galray.export.pyfunc import GalrayModel

set_model(GalrayModel())
