"""Any framework: judge a scikit-learn model's predictions with collapse-detect (no transformers model needed).

Write one row per eval example with the gold label and one ``prob_<class>`` column per class (the layout of the
predictions.csv collapse-detect itself writes), then run

    collapse-detect --predictions predictions.csv

An ONNX, TensorFlow or served model works the same way: only the file matters. With predicted labels only
(a ``predicted`` column), the count-based checks run and the score-based ones are marked as not available.

    python examples/sklearn_predictions.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

CLASSES = ["sports", "politics", "business"]


def write_predictions(out_dir: str | Path, seed: int = 0) -> Path:
    """Fit a deliberately imbalanced logistic regression (88% 'sports', strong regularisation) and write its
    eval-set probabilities to OUT_DIR/predictions.csv."""
    x, y = make_classification(n_samples=1200, n_features=8, n_informative=4, n_classes=3,
                               weights=[0.88, 0.06, 0.06], class_sep=0.6, random_state=seed)
    x_train, x_eval, y_train, y_eval = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
    model = LogisticRegression(C=0.01, max_iter=1000).fit(x_train, y_train)
    probs = model.predict_proba(x_eval)
    frame = pd.DataFrame({"gold": [CLASSES[i] for i in y_eval]})
    for c, name in enumerate(CLASSES):
        frame[f"prob_{name}"] = probs[:, c]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    frame.to_csv(path, index=False)
    return path


if __name__ == "__main__":
    path = write_predictions(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(f"wrote {path}; now run: collapse-detect --predictions {path}")
