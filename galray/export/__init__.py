"""galray models in other tools' formats: MLflow pyfunc models, SAELens folders, the Hugging Face hub layout.

- ``pyfunc.py``: the MLflow ``PythonModel`` of every kind (imports only ``galray.models``, so a model
  loads and predicts without galray's training code); ``pyfunc_entry.py`` is the file MLflow runs at load
  (models from code: nothing is cloudpickled);
- ``mlflow_model.py``: signatures, input examples, ``log_model`` + registration, and input-store lineage;
- ``saelens.py``: an SAE folded into SAELens's JumpReLU layout (pure torch);
- ``hf.py``: an encoder or VQ-VAE as a Hugging Face hub folder with a model card (pure torch + timm).
"""
