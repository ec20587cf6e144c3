"""The built-in offline demo: a shipped base, generated domains, its default run and its pretraining."""
