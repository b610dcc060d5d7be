"""The built-in teacher plugins (entry points in pyproject.toml): trained, self, ngram and hf.

Kept apart from ``archlab.baselines`` (the model slots' building blocks) because a teacher may train
or load a whole student, which imports the model and so the baselines.
"""
