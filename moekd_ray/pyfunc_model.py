"""The registered student as an MLflow pyfunc model, defined from code (MLflow "models from code").

Input: C function sources as a list of strings, a single string, a pandas Series, or a DataFrame with a string
column `func` (or a single column); over HTTP, {"inputs": [...]} or {"dataframe_split": ...}.
Output: a DataFrame with `probability` = P(vulnerable) per function, in input order.
Weights are safetensors and the tokenizer is a saved HF tokenizer: loading unpickles nothing. Loading first checks
every artifact file against the checksums recorded at registration (checksums.py): a damaged model is refused.
"""

import os

import mlflow
import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

try:
    from moekd_ray.checksums import verify
    from moekd_ray.int8 import is_int8, load_int8
    from moekd_ray.scoring import Scorer
    from moekd_ray.tokenization import load_tokenizer
except ImportError:  # served where moekd-ray is not installed: the copies logged with the model (code_paths)
    from checksums import verify
    from int8 import is_int8, load_int8
    from scoring import Scorer

    def load_tokenizer(folder):
        if os.path.isfile(os.path.join(folder, "input_transform.json")):
            raise RuntimeError("this student reads functions after identifier canonicalisation (tree-sitter): "
                               "serve it where moekd-ray is installed (pip install moekd-ray)")
        return AutoTokenizer.from_pretrained(folder)


def sources(model_input) -> list[str]:
    """The function sources in any accepted input shape."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        if "func" in model_input.columns:
            column = model_input["func"]
        elif model_input.shape[1] == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(f"give the C sources as a list of strings or a `func` column; got columns "
                             f"{list(model_input.columns)}")
    elif isinstance(model_input, str):
        column = [model_input]
    else:
        column = model_input
    funcs = []
    for value in column:
        if isinstance(value, (list, tuple, np.ndarray)):  # {"func": [a, b]} can arrive as one row holding a list
            funcs.extend(str(f) for f in value)
        else:
            funcs.append(str(value))
    return funcs


class StudentClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        verify(context.artifacts)  # before anything is read from them
        tokenizer = load_tokenizer(context.artifacts["tokenizer"])  # with its input transform, if it has one
        folder = context.artifacts["model"]
        model = load_int8(folder) if is_int8(folder) else AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True, dtype=torch.float32)  # as models.load_model
        self.scorer = Scorer(model, tokenizer)

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"probability": self.scorer(sources(model_input)).astype(np.float64)})


mlflow.models.set_model(StudentClassifier())
