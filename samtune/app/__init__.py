"""``samtune app``: a local page to try models by hand (``samtune.app.main``).

Imported only by the ``app`` sub-command: training, evaluation and the rest never load it.
"""
