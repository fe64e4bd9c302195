"""The registered student as an MLflow pyfunc model, defined from code (MLflow "models from code").

Input: a DataFrame with a string column `func` (C function source), or a list of strings.
Output: a DataFrame with `probability` = P(vulnerable) per function.
Weights are safetensors and the tokenizer is a saved HF tokenizer: loading unpickles nothing.
"""

import mlflow
import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class StudentClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        self.model = AutoModelForSequenceClassification.from_pretrained(
            context.artifacts["model"], use_safetensors=True
        ).eval()
        # RoBERTa positions start after the padding index: usable length is 2 less than the table.
        self.max_length = int(self.model.config.max_position_embeddings) - 2
        self.batch_size = 64

    def predict(self, context, model_input, params=None):
        column = model_input["func"] if isinstance(model_input, (pd.DataFrame, dict)) else model_input
        funcs = []
        for value in column:
            if isinstance(value, (list, tuple, np.ndarray)):  # {"func": [a, b]} can arrive as one row holding a list
                funcs.extend(str(f) for f in value)
            else:
                funcs.append(str(value))
        probs = []
        with torch.no_grad():
            for i in range(0, len(funcs), self.batch_size):
                enc = self.tokenizer(
                    funcs[i : i + self.batch_size], truncation=True, max_length=self.max_length,
                    padding=True, return_tensors="pt",
                )
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                probs.extend(torch.softmax(logits.float(), dim=-1)[:, 1].tolist())
        return pd.DataFrame({"probability": probs})


mlflow.models.set_model(StudentClassifier())
