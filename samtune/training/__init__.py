"""The training run behind ``samtune.train.train``: its setup, its steps, and its report."""
