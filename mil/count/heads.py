"""Built-in count heads: scikit-learn models on the differential, the ratio rule, and the metadata shortcut.

Every head: `fit(data: CountData, y, *, num_classes)` then `predict_proba(data) -> (P, num_classes)`; a class
missing from a fold's training patients gets probability 0 rather than shifting the columns.
"""

from __future__ import annotations

import numpy as np

from mil.count.differential import CountData
from mil.count.registry import register_count_head
from mil.errors import ConfigError


class CountHead:
    """Shared fit/predict plumbing: subclasses give the feature matrix and the sklearn estimator.

    When the data carry patient covariates (`CountData.covariates`), heads with `uses_covariates` see them as
    extra columns beside their own features; the shortcut and rule heads never do.
    """

    head_name = "count"
    uses_covariates = True
    reads_differential = True  # False: the head never looks at the cells' classes (no labels needed)

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self.model = None
        self.num_classes = 0

    def features(self, data: CountData) -> np.ndarray:
        return data.differential

    def estimator(self):
        raise NotImplementedError

    def inputs(self, data: CountData) -> np.ndarray:
        """(P, F) what the estimator sees: the head's features, then the covariates when it uses them."""
        x = self.features(data)
        if self.uses_covariates and data.covariates is not None and data.covariates.shape[1]:
            x = np.hstack([x, data.covariates])
        return x

    def fit(self, data: CountData, y: np.ndarray, *, num_classes: int) -> CountHead:
        self.num_classes = num_classes
        self.model = self.estimator()
        self.model.fit(self.inputs(data), np.asarray(y, dtype=np.int64))
        return self

    def predict_proba(self, data: CountData) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{self.head_name}: call fit() before predict_proba()")
        seen = self.model.predict_proba(self.inputs(data))  # (P, classes seen in training)
        probs = np.zeros((len(seen), self.num_classes))
        probs[:, np.asarray(self.model.classes_, dtype=np.int64)] = seen
        return probs


def _scaled_logreg(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Shares differ in scale by orders of magnitude (blasts vs. mitoses); scaling lets one C fit them all.
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=5000, class_weight="balanced", random_state=seed)
    )


@register_count_head("count.logreg")
class LogRegCountHead(CountHead):
    """Multinomial logistic regression on standardised shares (class-balanced)."""

    def __init__(self, *, seed: int = 0, c: float = 1.0) -> None:
        super().__init__(seed=seed)
        self.c = c

    def estimator(self):
        return _scaled_logreg(self.c, self.seed)


@register_count_head("count.rf")
class ForestCountHead(CountHead):
    """Random forest on the shares (class-balanced, one thread: CI machines share their cores)."""

    def __init__(self, *, seed: int = 0, n_estimators: int = 200, min_samples_leaf: int = 1) -> None:
        super().__init__(seed=seed)
        self.n_estimators, self.min_samples_leaf = n_estimators, min_samples_leaf

    def estimator(self):
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(
            n_estimators=self.n_estimators,
            min_samples_leaf=self.min_samples_leaf,
            class_weight="balanced",
            random_state=self.seed,
            n_jobs=1,
        )


@register_count_head("count.gb")
class BoostingCountHead(CountHead):
    """Gradient-boosted shallow trees on the shares."""

    def __init__(self, *, seed: int = 0, n_estimators: int = 100, max_depth: int = 2, learning_rate: float = 0.1):
        super().__init__(seed=seed)
        self.n_estimators, self.max_depth, self.learning_rate = n_estimators, max_depth, learning_rate

    def estimator(self):
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            random_state=self.seed,
        )


@register_count_head("count.ratio")
class RatioRuleCountHead(CountHead):
    """The single-threshold rule on one group's share (the blast ratio of the AML study), fitted on training patients.

    Binary: one threshold (a depth-1 stump on the share). Multi-class generalisation: a 1-D decision tree on the
    same share with at most C leaves, i.e. C-1 thresholds cutting the ratio axis into intervals, each interval
    voting for the diagnosis most frequent in it (a ratio can only order diagnoses along one axis, which is
    exactly the rule's limit). Probabilities are the training class frequencies in the patient's interval.
    """

    uses_covariates = False  # one threshold on one share: that is the rule

    def __init__(self, *, seed: int = 0, group: str = "blast", min_samples_leaf: int = 1) -> None:
        super().__init__(seed=seed)
        self.group, self.min_samples_leaf = group, min_samples_leaf

    def features(self, data: CountData) -> np.ndarray:
        return data.share(self.group)[:, None]  # (P, 1)

    def estimator(self):
        from sklearn.tree import DecisionTreeClassifier

        return DecisionTreeClassifier(
            max_leaf_nodes=max(2, self.num_classes),
            min_samples_leaf=self.min_samples_leaf,
            class_weight="balanced",
            random_state=self.seed,
        )

    def thresholds(self) -> list[float]:
        """The fitted cut points on the share, in increasing order (for reports)."""
        tree = self.model.tree_
        return sorted(float(t) for t, left in zip(tree.threshold, tree.children_left) if left != -1)


@register_count_head("count.meta")
class MetadataCountHead(CountHead):
    """Shortcut baseline: sees only bag metadata (log cell count, labelled fraction), never a cell's class.

    When it scores close to the real heads, the cohort's diagnoses ride on how cells were captured or labelled.
    """

    uses_covariates = False  # a shortcut detector must see the capture metadata alone
    reads_differential = False

    def __init__(self, *, seed: int = 0, c: float = 1.0) -> None:
        super().__init__(seed=seed)
        self.c = c

    def features(self, data: CountData) -> np.ndarray:
        return data.meta

    def estimator(self):
        return _scaled_logreg(self.c, self.seed)


@register_count_head("count.covariates")
class CovariateCountHead(CountHead):
    """The clinical baseline: logistic regression on the patient covariates alone (age, sex, blood counts), no cell.

    Joins every comparison that uses covariates, so a user sees what the cells add to what the clinic knows.
    """

    uses_covariates = False  # they are its features already
    reads_differential = False

    def __init__(self, *, seed: int = 0, c: float = 1.0) -> None:
        super().__init__(seed=seed)
        self.c = c

    def features(self, data: CountData) -> np.ndarray:
        if data.covariates is None or not data.covariates.shape[1]:
            raise ConfigError("count.covariates needs patient covariates: name them with --covariates age,sex,...")
        return data.covariates

    def estimator(self):
        return _scaled_logreg(self.c, self.seed)
