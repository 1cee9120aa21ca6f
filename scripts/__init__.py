"""Scripts that built the shipped assets, run from the repository root: `python -m scripts.scenes`
(the toy scenes), `python -m scripts.train_tiny` (assets/tiny-flux). Not installed: no package imports them."""
